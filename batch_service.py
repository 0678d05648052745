from qwen3_vl_service.batch.command import main
raise SystemExit(main())

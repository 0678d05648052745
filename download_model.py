from qwen3_vl_service.download.command import main
raise SystemExit(main())

from qwen3_vl_service.download import main
raise SystemExit(main())

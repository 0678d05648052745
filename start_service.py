from qwen3_vl_service.launcher import main
raise SystemExit(main())

from qwen3_vl_service.lifecycle.launcher import main
raise SystemExit(main())

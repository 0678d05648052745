from qwen3_vl_service.media.server import main
raise SystemExit(main())

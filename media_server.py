from qwen3_vl_service.media import main

raise SystemExit(main())

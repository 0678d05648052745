from qwen3_vl_service.stop import main

raise SystemExit(main())

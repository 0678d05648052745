from qwen3_vl_service.lifecycle.stop import main

raise SystemExit(main())

from qwen3_vl_service.lifecycle.status import main

raise SystemExit(main())

from streamvi.cli.main import main

raise SystemExit(main())

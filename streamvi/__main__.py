from streamvi.cli import main

raise SystemExit(main())

"""Ray Serve config for sentdisc (`serve deploy serve/config.yaml`); the application itself is
`sentdisc.serving` in the package: `serve run sentdisc.serving:build_app checkpoint=DIR ...`."""

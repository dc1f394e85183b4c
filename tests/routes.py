"""Every API route but /healthz, each of which must demand the bearer token."""

PROTECTED_ROUTES = [
    ("GET", "/sessions"),
    ("POST", "/sessions"),
    ("DELETE", "/sessions"),
    ("GET", "/sessions/x"),
    ("PATCH", "/sessions/x"),
    ("DELETE", "/sessions/x"),
    ("GET", "/sessions/x/connections"),
    ("GET", "/audit"),
    ("GET", "/metrics"),
    ("GET", "/gpus"),
    ("GET", "/gpus/profiles"),
    ("GET", "/gpus/available"),
    ("GET", "/nodes"),
    ("GET", "/queue"),
    ("GET", "/users/x/usage"),
    ("PUT", "/users/x/limits"),
]

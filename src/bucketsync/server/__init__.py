"""The HTTP server: routes as data, typed bodies, the generated OpenAPI document, TLS."""

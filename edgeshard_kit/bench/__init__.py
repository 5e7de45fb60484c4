"""The `edgeshard bench` families: one module each; functions return rows and print nothing."""

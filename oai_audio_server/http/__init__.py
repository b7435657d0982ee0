"""The HTTP surface (Litestar): thin routes over the service layer."""

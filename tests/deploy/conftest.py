import pytest


@pytest.fixture(scope="session")
def app_routes() -> set[str]:
    """The paths the gateway serves, from the app's own OpenAPI schema (no model is loaded to
    build it; routers it includes are resolved there, whatever FastAPI's route objects are)."""
    from server.entrypoints.app import create_app
    from server.config import Settings
    return set(create_app(Settings()).openapi()["paths"])

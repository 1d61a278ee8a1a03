import pytest


@pytest.fixture(scope="session")
def app_routes() -> set[str]:
    """The paths the gateway serves, from the app itself (no model is loaded to build it)."""
    from server.api.app import create_app
    from server.api.settings import Settings
    return {route.path for route in create_app(Settings()).routes}

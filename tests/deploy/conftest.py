"""The shipped nats-server fixture, shared by the deploy tests (defined beside the permission tests)."""

from tests.deploy.test_nats_permissions import main_nats

__all__ = ["main_nats"]

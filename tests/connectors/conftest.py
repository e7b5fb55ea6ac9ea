"""Connector tests: vcsim fixtures come from tests/connectors/vcsim.py."""
from tests.connectors.vcsim import free_port, vcsim, vcsim_binary, vcsim_factory  # noqa: F401 - fixtures

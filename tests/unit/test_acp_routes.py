"""The ACP route table: every agent method of the installed `acp` has a route, and the rest
(extensions, unknown methods) are routed as the module says."""

from __future__ import annotations

from acp.meta import AGENT_METHODS

from router.acp import routes


def test_every_agent_method_of_the_installed_acp_has_a_route() -> None:
    missing = sorted(set(AGENT_METHODS.values()) - set(routes.ROUTES))
    assert missing == [], f"new acp methods without a route: {missing}"


def test_the_session_lifecycle_methods_route_as_documented() -> None:
    expected = {
        "initialize": routes.INITIALIZE, "authenticate": routes.BROADCAST,
        "session/new": routes.NEW, "session/load": routes.LOAD, "session/resume": routes.LOAD,
        "session/fork": routes.FORK, "session/list": routes.LIST,
        "session/prompt": routes.SESSION, "session/cancel": routes.SESSION,
        "session/close": routes.SESSION, "session/status": routes.STATUS,
    }
    for method, route in expected.items():
        assert routes.route_of(method, has_session=True) == route, method


def test_an_extension_method_follows_its_session_and_an_unknown_method_has_no_route() -> None:
    assert routes.route_of("_vendor/thing", has_session=True) == routes.SESSION
    assert routes.route_of("_vendor/thing", has_session=False) == routes.ANY
    assert routes.route_of("session/teleport", has_session=True) is None


def test_only_load_and_resume_establish_a_session_and_only_close_ends_one() -> None:
    assert routes.ESTABLISHING == {"session/load", "session/resume"}
    assert routes.ENDING == {"session/close"}
    assert all(routes.ROUTES[m] in (routes.LOAD, routes.SESSION)
               for m in routes.ESTABLISHING | routes.ENDING)


def test_metric_labels_are_bounded_to_the_table_plus_one_for_extensions() -> None:
    labels = routes.metric_methods()
    assert len(labels) == len(set(labels)) == len(routes.ROUTES) + 1
    assert labels[-1] == "_extension"

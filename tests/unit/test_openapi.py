"""The OpenAPI description is true: it names every route and only routes, it is served
publicly, and Schemathesis finds no 5xx and no answer that breaks it on a live gateway."""

import asyncio
import re

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.api import create_app, middleware
from gateway.api.openapi import PATHS, SPEC
from gateway.gpu.sim import SimBackend
from tests.routes import PROTECTED_ROUTES
from tests.unit.conftest import TOKEN, unit_config
from tests.unit.helpers import EXAMPLES

EXAMPLES_PER_OPERATION = 40
# A 5xx the spec names (503 no_port_available once the fuzzer's sessions fill the pool) is
# an answer; any other status, 500 included, fails status_code_conformance.
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
]


def _routes(tmp_path) -> set[tuple[str, str]]:
    app = create_app(unit_config(tmp_path))
    return {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method not in ("HEAD", "OPTIONS")
    }


def _described() -> set[tuple[str, str]]:
    return {
        (method, path)
        for path, item in PATHS.items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }


def test_every_route_is_described_and_every_description_is_a_route(tmp_path):
    assert _routes(tmp_path) == _described()


def test_protected_routes_list_is_complete():
    """tests/routes.py names every route that needs the token, as the spec says."""
    protected = {
        (method.upper(), re.sub(r"\{[^}]+\}", "x", path))
        for path, item in PATHS.items()
        for method, op in item.items()
        if method != "parameters" and op.get("security") != []
    }
    public = {
        path
        for path, item in PATHS.items()
        for method, op in item.items()
        if method != "parameters" and op.get("security") == []
    }
    assert protected == set(PROTECTED_ROUTES)
    assert public == {*middleware.PUBLIC_PATHS, middleware.PUBLIC_PREFIX + "{name}"}


async def test_openapi_json_is_public(make_client):
    client = await make_client()
    resp = await client.get("/openapi.json", headers={"Authorization": ""})
    assert resp.status == 200
    assert await resp.json() == SPEC


def _fuzz(base_url: str) -> None:
    """Every operation, positive and negative examples, checked against the spec."""
    schema = schemathesis.openapi.from_dict(SPEC)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if len(operation.query) or len(operation.body):  # else nothing can be made invalid
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: schemathesis.Case) -> None:
                response = case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS)
                assert response.status_code != 500

            check()


async def test_schemathesis_finds_no_server_error_or_schema_violation(make_server):
    """On a simulated host with MIG and whole GPUs, so GPU answers have content to check."""
    server = await make_server(
        gpu_factory=lambda: SimBackend(EXAMPLES / "topology-mixed.json"),
        default_mig_profile="3g.40gb",
        mig_dynamic=True,
    )
    await asyncio.to_thread(_fuzz, str(server.make_url("")).rstrip("/"))

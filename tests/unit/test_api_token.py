"""Where the API token comes from: ``SANDMAN_API_TOKEN``, ``--api-token-file``, or a file
generated once; a token file that cannot be used stops the start."""

from __future__ import annotations

import stat

import pytest

from gateway.api import create_app
from gateway.errors import ApiTokenUnavailable
from gateway.gpu.none import NoneBackend
from tests.unit.conftest import TOKEN, unit_config


@pytest.fixture
def start(aiohttp_client, tmp_path, runtime, plain_workspaces):
    async def start(**overrides):
        config = unit_config(tmp_path, **overrides)
        app = create_app(config, runtime_factory=lambda: runtime, gpu_factory=NoneBackend)
        return await aiohttp_client(app)

    return start


async def answers(client, token: str) -> int:
    return (await client.get("/sessions", headers={"Authorization": f"Bearer {token}"})).status


async def test_the_token_file_holds_the_token(start, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("  from-the-file \n")
    client = await start(api_token=None, api_token_file=token_file)
    assert await answers(client, "from-the-file") == 200
    assert await answers(client, TOKEN) == 401
    assert not (tmp_path / "state" / "api-token").exists()  # nothing generated beside it


async def test_without_either_a_token_is_generated_once_and_kept(start, tmp_path):
    client = await start(api_token=None)
    generated = tmp_path / "state" / "api-token"
    token = generated.read_text().strip()
    assert len(token) >= 32 and stat.S_IMODE(generated.stat().st_mode) == 0o600
    assert await answers(client, token) == 200
    await client.close()
    again = await start(api_token=None)
    assert await answers(again, token) == 200


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read the API token file"), ("  \n", "is empty")],
)
async def test_a_token_file_that_cannot_be_used_stops_the_start(start, tmp_path, content, message):
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    with pytest.raises(ApiTokenUnavailable, match=message):
        await start(api_token=None, api_token_file=token_file)
    assert not (tmp_path / "state" / "api-token").exists()  # no token made up instead


async def test_a_token_and_a_token_file_together_stop_the_start(start, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\n")
    with pytest.raises(ApiTokenUnavailable, match="both set"):
        await start(api_token="from-the-environment", api_token_file=token_file)

"""The gateway's REST API over aiohttp: one method per call, errors as :class:`ApiError`."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import aiohttp

from gateway.client.settings import Settings

TIMEOUT = aiohttp.ClientTimeout(total=120, connect=10)


class ApiError(Exception):
    """The gateway refused (its ``error`` and ``code``) or could not be reached (code None)."""

    def __init__(self, message: str, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


class Api:
    """An open connection to one gateway; use as ``async with Api(settings) as api``."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.url
        self._http = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {settings.token}"}, timeout=TIMEOUT
        )

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._http.close()

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        """The decoded JSON answer of ``method path``.

        Raises:
            ApiError: an error answer, an unreachable server, or an answer that is not JSON.
        """
        try:
            async with self._http.request(
                method, self.url + path, json=json, params=params
            ) as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
                if resp.status >= 400:
                    if isinstance(body, dict) and "error" in body:
                        raise ApiError(str(body["error"]), str(body.get("code")), resp.status)
                    raise ApiError(f"HTTP {resp.status} {resp.reason}", None, resp.status)
                if body is None:
                    raise ApiError(f"{method} {path}: the answer is not JSON", None, resp.status)
                return body
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ApiError(f"cannot reach {self.url}: {exc or type(exc).__name__}") from None

    async def sessions(self) -> list[dict[str, Any]]:
        return await self.call("GET", "/sessions")

    async def find_session(self, ref: str) -> dict[str, Any]:
        """The live session named by ``ref`` (see :func:`pick_session`).

        Raises:
            ApiError: none matches or several do, or the list could not be had.
        """
        return pick_session(await self.sessions(), ref)


def pick_session(sessions: list[dict[str, Any]], ref: str) -> dict[str, Any]:
    """The session whose id is ``ref``, else the only one of user ``ref``.

    Raises:
        ApiError: none matches (``session_not_found``) or several do (``ambiguous``).
    """
    by_id = [s for s in sessions if s["id"] == ref]
    matches = by_id or [s for s in sessions if s["user_id"] == ref]
    if not matches:
        raise ApiError(f"no live session with id or user {ref!r}", "session_not_found", 404)
    if len(matches) > 1:
        ids = ", ".join(s["id"] for s in matches)
        raise ApiError(f"user {ref!r} has several sessions ({ids}): name one by id", "ambiguous")
    return matches[0]

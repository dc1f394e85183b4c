"""The API's access log: what changes something or fails at INFO, routine reads at DEBUG.

The admin page polls several routes every few seconds, health checks and metrics scrapes
come all day: at INFO they buried the lines that matter (who created or ended what)."""

from __future__ import annotations

import logging

from aiohttp import web_log
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

READS = frozenset({"GET", "HEAD", "OPTIONS"})


class _AtDebug:
    """A logger whose ``info`` is its ``debug``, for aiohttp's line formatter."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def info(self, *args: object, **kwargs: object) -> None:
        self._logger.debug(*args, **kwargs)  # type: ignore[arg-type]

    def exception(self, *args: object, **kwargs: object) -> None:
        self._logger.exception(*args, **kwargs)  # type: ignore[arg-type]


def routine(method: str, status: int) -> bool:
    """A read that succeeded: logged at DEBUG."""
    return method in READS and status < 400


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access log format, at DEBUG for :func:`routine` requests, else INFO."""

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self._info = web_log.AccessLogger(logger, log_format)
        self._debug = web_log.AccessLogger(_AtDebug(logger), log_format)  # type: ignore[arg-type]

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG) or self.logger.isEnabledFor(logging.INFO)

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if routine(request.method, response.status):
            if self.logger.isEnabledFor(logging.DEBUG):
                self._debug.log(request, response, time)
        elif self.logger.isEnabledFor(logging.INFO):
            self._info.log(request, response, time)

"""Typed keys for the state each resource puts on the aiohttp application."""

from __future__ import annotations

from aiohttp import web

from gateway.audit import Audit
from gateway.budgets import Budgets
from gateway.config import Config
from gateway.gpu.allocator import GpuAllocator
from gateway.idle_reclaim import IdleReclaimer
from gateway.metrics import Metrics
from gateway.runtime.base import Runtime
from gateway.sessions import SessionManager
from gateway.ssh.identity import HostIdentity
from gateway.store import Store
from gateway.waiting import WaitingList

CONFIG = web.AppKey("config", Config)
API_TOKEN = web.AppKey("api_token", str)
STORE = web.AppKey("store", Store)
RUNTIME = web.AppKey("runtime", Runtime)
GPUS = web.AppKey("gpus", GpuAllocator)
SESSIONS = web.AppKey("sessions", SessionManager)
IDLE = web.AppKey("idle", IdleReclaimer)
AUDIT = web.AppKey("audit", Audit)
METRICS = web.AppKey("metrics", Metrics)
IDENTITY = web.AppKey("identity", HostIdentity)
BUDGETS = web.AppKey("budgets", Budgets)
WAITING = web.AppKey("waiting", WaitingList)

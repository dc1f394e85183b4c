"""Hypothesis state machines: the port pool and GPU slice allocation against simple models.

Random interleavings of creates, ends and outside interference; after every step no port
or GPU slice is held twice, a user's sticky port is honoured whenever it is free, and
what is listed as available is exactly what is free.
"""

import asyncio
import json
import socket
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gateway.audit import Audit
from gateway.budgets import Budgets
from gateway.core.gpu_select import FULL_GPU
from gateway.core.ports import PortRange
from gateway.errors import GpuInstanceBusy, NoGpuAvailable, NoPortAvailable, UnknownMigProfile
from gateway.gpu.allocator import Allocation, GpuAllocator
from gateway.gpu.none import NoneBackend
from gateway.gpu.sim import SimBackend
from gateway.metrics import Metrics
from gateway.models import CreateRequest, Session
from gateway.sessions import SessionManager
from gateway.store import Store
from tests.fakes import Clock, FakeRuntime
from tests.net import UNIT_PORT_BASE as FIRST_PORT
from tests.net import port_bindable
from tests.unit.conftest import unit_config

USERS = st.sampled_from(["ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal"])
POOL = PortRange(FIRST_PORT, FIRST_PORT + 5)  # real loopback ports
MACHINE_SETTINGS = settings(max_examples=50, stateful_step_count=40, deadline=None)


@MACHINE_SETTINGS
class PortPool(RuleBasedStateMachine):
    """The real reservation (``SessionManager._reserve``: the store's held and sticky
    ports, ``PortRange.candidates`` and the bind loop on real loopback sockets) and the
    real end path, against the rule: your own port if free, else the lowest port nobody
    calls theirs, else the port longest unused by its owner; a port another process holds
    is skipped. (Reserving stops short of the container: the rest of a create does not
    touch ports.)"""

    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.TemporaryDirectory()
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        config = unit_config(Path(self.folder.name), ssh_ports=POOL)
        self.store = self._run(Store.open(config.db_path))
        gpus = GpuAllocator(NoneBackend(), default_profile=None, dynamic=False)
        self.manager = SessionManager(
            config,
            store=self.store,
            runtime=FakeRuntime(),
            gpus=gpus,
            budgets=Budgets(config, store=self.store, gpus=gpus, clock=self.clock),
            audit=Audit(self.store, Metrics(), None, self.clock),
            metrics=Metrics(),
            identity=None,  # reserving and ending never certify a host key
            instance_id="model",
            clock=self.clock,
        )
        self.live: dict[str, Session] = {}  # user -> their live session
        self.sticky: dict[str, tuple[int, int]] = {}  # model: user -> (port, last given at)
        self.foreign: dict[int, socket.socket] = {}  # ports some other process listens on
        self.now = 0

    def teardown(self) -> None:
        self._run(self.manager.close())
        self._run(self.store.close())
        for sock in self.foreign.values():
            sock.close()
        self.loop.close()
        self.folder.cleanup()

    def _run(self, work):
        return self.loop.run_until_complete(work)

    def _expected(self, user: str) -> int | None:
        held = {s.ssh_port for s in self.live.values()}
        free = [p for p in range(POOL.start, POOL.end + 1) if p not in held]
        free = [p for p in free if p not in self.foreign]
        own = self.sticky.get(user)
        if own is not None and own[0] in free:
            return own[0]
        others = {port: at for u, (port, at) in self.sticky.items() if u != user}
        unclaimed = [p for p in free if p not in others]
        if unclaimed:
            return unclaimed[0]
        claimed = sorted((p for p in free if p in others), key=lambda p: others[p])
        return claimed[0] if claimed else None

    @rule(user=USERS)
    def create(self, user: str) -> None:
        if user in self.live:
            return
        self.clock.advance(1)  # a port's "last given at" is its session's creation
        request = CreateRequest(user_id=user, ttl_seconds=60, image="i")
        expected = self._expected(user)
        try:
            live = self._run(self.manager._reserve(request, (), None, lambda: None))
        except NoPortAvailable:
            assert expected is None
            return
        port = live.session.ssh_port
        assert port == expected
        assert port_bindable(port) is False  # the listener holds it
        self.now += 1
        self.live[user] = live.session
        self.sticky = {u: v for u, v in self.sticky.items() if v[0] != port}
        self.sticky[user] = (port, self.now)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        session = self.live.pop(data.draw(st.sampled_from(sorted(self.live))))
        assert self._run(self.manager.end(session, "session_deleted"))
        assert port_bindable(session.ssh_port)  # released with the session

    @rule(port=st.integers(POOL.start, POOL.end))
    def foreign_process_toggles(self, port: int) -> None:
        if port in self.foreign:
            self.foreign.pop(port).close()
        elif port not in {s.ssh_port for s in self.live.values()}:
            self.foreign[port] = socket.create_server(("127.0.0.1", port))

    @invariant()
    def no_port_held_twice(self) -> None:
        ports = [s.ssh_port for s in self.live.values()]
        assert len(set(ports)) == len(ports)
        assert not set(self.foreign) & set(ports)
        assert self._run(self.store.held_ports()) == set(ports)


TOPOLOGY = {
    "host": "model",
    "gpus": [
        {"model": "A100-80GB", "mig": True, "instances": ["3g.40gb", "1g.10gb", "1g.10gb"]},
        {"model": "H100-80GB", "mig": True},
        {"model": "A100-40GB", "mig": False},
        {"model": "H200-141GB", "mig": False},
    ],
}
PROFILES = st.sampled_from([None, "1g.10gb", "2g.20gb", "3g.40gb", "7g.80gb"])
DEFAULT_PROFILE = "3g.40gb"


@MACHINE_SETTINGS
class GpuSlices(RuleBasedStateMachine):
    """The real :class:`GpuAllocator` over the simulator, the database played by a dict."""

    dynamic = False

    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.TemporaryDirectory()
        topology = Path(self.folder.name) / "topology.json"
        topology.write_text(json.dumps(TOPOLOGY))
        self.loop = asyncio.new_event_loop()
        self.backend = SimBackend(topology)
        self.gpus = GpuAllocator(
            self.backend, default_profile=DEFAULT_PROFILE, dynamic=self.dynamic
        )
        self.live: dict[str, Allocation] = {}
        self.initial = {d.uuid for d in self._devices()}

    def teardown(self) -> None:
        self.loop.close()
        self.folder.cleanup()

    def _run(self, work):
        return self.loop.run_until_complete(work)

    def _devices(self):
        return [d for g in self._run(self.backend.inventory()) for d in g.mig_devices]

    def _allocated(self) -> set[str]:
        return {a.uuid for a in self.live.values() if a.uuid is not None}

    def _free(self) -> list:
        return self._run(self.gpus.available(self._allocated()))

    def _allocate(self, user: str, **selector) -> Allocation | None:
        request = CreateRequest(user_id=user, ttl_seconds=60, image="i", **selector)
        free_before = self._free()
        try:
            allocation = self._run(self.gpus.allocate(request, self._allocated()))
        except NoGpuAvailable:
            self._assert_refusal_justified(selector.get("mig_profile"), free_before)
            return None
        assert allocation.uuid not in self._allocated(), "a slice given twice"
        assert allocation.created == (allocation.uuid not in {f.uuid for f in free_before})
        if selector.get("mig_profile"):
            assert allocation.profile == selector["mig_profile"]
        self.live[user] = allocation
        return allocation

    def _assert_refusal_justified(self, profile: str | None, free_before: list) -> None:
        """Refused only when nothing fitting was free and, with ``dynamic``, no MIG GPU
        has room for one more: the simulator is asked to make one, which must fail too."""
        wanted = profile or DEFAULT_PROFILE
        fitting = {wanted, FULL_GPU} if profile is None else {wanted}
        assert not [f for f in free_before if f.profile in fitting]
        if not self.dynamic:
            return
        for gpu in self._run(self.backend.inventory()):
            if not gpu.mig_enabled:
                continue
            try:
                made = self._run(self.backend.create_instance(gpu.uuid, wanted))
            except (NoGpuAvailable, UnknownMigProfile):
                continue
            raise AssertionError(f"refused {wanted}, but {gpu.uuid} had room ({made.uuid})")

    @rule(user=USERS, profile=PROFILES)
    def create(self, user: str, profile: str | None) -> None:
        if user not in self.live:
            self._allocate(user, mig_profile=profile)

    @precondition(lambda self: self.live)
    @rule(user=USERS, data=st.data())
    def create_naming_a_held_instance(self, user: str, data: st.DataObject) -> None:
        held = sorted(u for a in self.live.values() if (u := a.uuid) and a.profile != FULL_GPU)
        if user in self.live or not held:
            return
        try:
            self._allocate(user, mig_instance_uuid=data.draw(st.sampled_from(held)))
        except GpuInstanceBusy:
            return
        raise AssertionError("a held instance was given again")

    @rule(user=USERS, data=st.data())
    def create_naming_a_free_instance(self, user: str, data: st.DataObject) -> None:
        free = [f.uuid for f in self._free() if f.profile != FULL_GPU]
        if user in self.live or not free:
            return
        uuid = data.draw(st.sampled_from(free))
        allocation = self._allocate(user, mig_instance_uuid=uuid)
        assert allocation is not None and allocation.uuid == uuid

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        user = data.draw(st.sampled_from(sorted(self.live)))
        self._run(self.gpus.release(self.live.pop(user)))

    @invariant()
    def available_is_exactly_what_is_free(self) -> None:
        allocated = self._allocated()
        assert len(allocated) == sum(a.uuid is not None for a in self.live.values())
        free = {f.uuid for f in self._free()}
        assert not free & allocated
        devices = {d.uuid for d in self._devices()}
        whole = {g.uuid for g in self._run(self.backend.inventory()) if not g.mig_enabled}
        assert allocated | free == devices | whole  # nothing lost, nothing made up
        created = {a.uuid for a in self.live.values() if a.created}
        assert devices == self.initial | created  # made instances go with their session


class DynamicGpuSlices(GpuSlices):
    dynamic = True


TestPortPool = PortPool.TestCase
TestGpuSlices = GpuSlices.TestCase
TestDynamicGpuSlices = DynamicGpuSlices.TestCase

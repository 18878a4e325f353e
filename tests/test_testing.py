"""micro.testing: the memory runtime, one-line call/ask, tool-call assertions, the smoke check; micro.idempotency."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import anyio
import msgspec
import pytest

import micro
from micro import context, idempotency
from micro.agent.loop import system_prompt
from micro.codec import codec_for
from micro.errors import BadRequest, NotFound, ResourceExhausted, UsageError
from micro.middleware import Next, Request
from micro.testing import (
    ask,
    assert_called,
    assert_not_called,
    assert_offered,
    call,
    runtime,
    scripted,
    tool_calls,
)
from micro.testing.pytest_plugin import micro_runtime  # noqa: F401  (the fixture, as a plugin user gets it)
from micro.testing.smoke import check_app, example_request

# -- a small service --------------------------------------------------------------------------


class AddRequest(msgspec.Struct):
    title: str


class GetRequest(msgspec.Struct):
    id: str


class ListRequest(msgspec.Struct):
    query: str = ""


class Note(msgspec.Struct):
    id: str
    title: str


class NoteResponse(msgspec.Struct):
    note: Note


class ListResponse(msgspec.Struct):
    notes: list[Note]
    total: int


class Notes:
    """Notes kept in memory."""

    def __init__(self) -> None:
        self.notes: dict[str, Note] = {}
        self.runs = 0

    async def Add(self, req: AddRequest) -> NoteResponse:
        """Add a note with a title."""
        self.runs += 1
        if not req.title:
            raise BadRequest("title: must not be empty")
        note = Note(str(len(self.notes) + 1), req.title)
        self.notes[note.id] = note
        return NoteResponse(note)

    async def Get(self, req: GetRequest) -> NoteResponse:
        """Get a note by id."""
        if req.id not in self.notes:
            raise NotFound(f"no note {req.id!r}")
        return NoteResponse(self.notes[req.id])

    async def List(self, req: ListRequest) -> ListResponse:
        """List the notes whose title contains query."""
        found = [n for n in self.notes.values() if req.query in n.title]
        return ListResponse(found, len(found))


def notes_agent(model: micro.ai.Model | None = None) -> micro.Agent:
    return micro.NewAgent("notes-mgr", services=["notes"], prompt="You keep notes.",
                          provider=model if model is not None else scripted.turns("no model given"))


# -- runtime() --------------------------------------------------------------------------------


async def test_runtime_is_memory_backed_and_joined_by_services_without_runtime() -> None:
    async with runtime() as rt:
        assert rt.registry.url.startswith("memory://")
        assert rt.store.url.startswith("memory://")
        svc = micro.New("notes")  # as an app.py writes it: no runtime=
        svc.handle(Notes())
        async with svc:
            assert svc.runtime is rt
            assert [r.name for r in await rt.registry.list()] == ["notes"]
            assert (await rt.client.call("notes", "Notes.List", {}))["total"] == 0
        assert micro.Runtime.current() is rt
    assert micro.Runtime.current() is not rt  # the loop's slot is given back


async def test_runtimes_are_isolated() -> None:
    async with runtime() as a, runtime(install=False) as b:
        svc = micro.New("notes", runtime=a)
        svc.handle(Notes())
        async with svc:
            assert await b.registry.list() == []


async def test_micro_runtime_fixture(micro_runtime: micro.Runtime) -> None:  # noqa: F811
    svc = micro.New("notes")
    svc.handle(Notes())
    async with svc:
        assert svc.runtime is micro_runtime
        rsp = await call(svc, "Notes.Add", {"title": "a"})  # running: called where it runs
    assert rsp == {"note": {"id": "1", "title": "a"}}


# -- call() -----------------------------------------------------------------------------------


async def test_call_a_handler_in_one_line() -> None:
    notes = Notes()
    assert await call(notes, "Notes.Add", {"title": "milk"}) == {"note": {"id": "1", "title": "milk"}}
    rsp = await call(notes, "Notes.List", ListRequest(query="mi"), response_type=ListResponse)
    assert rsp == ListResponse([Note("1", "milk")], 1)
    with pytest.raises(NotFound, match="no note 'x'"):
        await call(notes, "Notes.Get", {"id": "x"})
    with pytest.raises(BadRequest, match=r"\$.title"):
        await call(notes, "Notes.Add", {"title": 7})


async def test_call_names_the_service_and_leaves_nothing_running() -> None:
    async with runtime() as rt:
        seen: list[str] = []

        class Who:
            async def Name(self, req: ListRequest) -> ListRequest:
                """Which service runs this."""
                seen.extend(r.name for r in await rt.registry.list())
                return req

        await call(Who(), "Who.Name", {}, service="whoami")
        assert seen == ["whoami"]
        assert await rt.registry.list() == []


async def test_call_starts_a_stopped_service_for_the_call_only() -> None:
    svc = micro.New("notes")
    svc.handle(Notes())
    assert (await call(svc, "Notes.Add", {"title": "x"}))["note"]["title"] == "x"
    assert "notes" not in svc.runtime.local
    with pytest.raises(UsageError, match="not open"):
        _ = svc.runtime.task_group  # the memory runtime it ran in is closed again


async def test_call_over_the_network_path() -> None:
    async with runtime():  # the service stops after each call; this runtime outlives them
        svc = micro.Service("notes", max_message_size=200)  # enforced by the gRPC server only
        svc.handle(Notes())
        big = {"title": "x" * 1000}
        assert (await call(svc, "Notes.Add", big))["note"]["id"] == "1"
        with pytest.raises(ResourceExhausted):
            await call(svc, "Notes.Add", big, network=True)
        assert await call(svc, "Notes.Add", {"title": "y"}, network=True) == {"note": {"id": "2", "title": "y"}}


async def test_call_refuses_a_class() -> None:
    with pytest.raises(UsageError, match=r"handler instance"):
        await call(Notes, "Notes.List", {})


# -- ask() and the assertions -----------------------------------------------------------------


async def test_ask_a_factory_with_a_scripted_model() -> None:
    notes = Notes()
    model = scripted.turns(
        scripted.call("notes_Notes_Add", title="milk"),
        scripted.call("notes_Notes_List", query="mi"),
        "You have one note: milk.",
    )
    rsp = await ask(notes_agent, "Note milk, then list", model=model, services={"notes": notes})
    assert rsp.reply == "You have one note: milk."
    assert [n.title for n in notes.notes.values()] == ["milk"]

    call_ = assert_called(model, "notes_Notes_Add", title="milk")
    assert call_.result == '{"note":{"id":"1","title":"milk"}}'
    assert not call_.is_error
    assert_called(model, "notes_Notes_List")
    assert_not_called(model, "notes_Notes_Get")
    assert assert_offered(model, "notes_Notes_Get").description == "Get a note by id."
    assert [c.name for c in tool_calls(rsp)] == ["notes_Notes_Add", "notes_Notes_List"]
    assert_called(rsp, "notes_Notes_List", query="mi")


async def test_assertion_messages_list_the_calls_made() -> None:
    model = scripted.turns(scripted.call("notes_Notes_Get", id="9"), "none")
    rsp = await ask(notes_agent, "get 9", model=model, services=[Notes()])
    with pytest.raises(AssertionError, match=r"notes_Notes_Get\(id='1'\).*were: notes_Notes_Get\(id='9'\)"):
        assert_called(model, "notes_Notes_Get", id="1")
    with pytest.raises(AssertionError, match="it was called"):
        assert_not_called(rsp, "notes_Notes_Get")
    with pytest.raises(AssertionError, match="never offered"):
        assert_offered(model, "nope")
    (got,) = tool_calls(model, "notes_Notes_Get")
    assert got.is_error and "no note '9'" in (got.result or "")


async def test_ask_an_agent_object_swaps_its_model_for_the_call_only() -> None:
    agent = notes_agent()
    original = agent.model
    model = scripted.turns("hello from the test model")
    rsp = await ask(agent, "hi", model=model)
    assert rsp.reply == "hello from the test model"
    assert agent.model is original
    assert model.calls[0].system == system_prompt("You keep notes.")


async def test_ask_a_running_agent(micro_runtime: micro.Runtime) -> None:  # noqa: F811
    notes = micro.New("notes")
    notes.handle(Notes())
    model = scripted.turns(scripted.call("notes_Notes_List"), "empty")
    async with notes, notes_agent(model) as agent:
        rsp = await ask(agent, "list")
    assert rsp.reply == "empty"
    assert assert_called(model, "notes_Notes_List").result == '{"notes":[],"total":0}'


async def test_ask_refuses_what_is_not_an_agent() -> None:
    with pytest.raises(UsageError, match=r"not a micro\.Agent"):
        await ask(lambda: Notes(), "hi")  # type: ignore[arg-type, return-value]


# -- idempotency ------------------------------------------------------------------------------


def notes_service(**kwargs: object) -> tuple[micro.Service, Notes]:
    notes = Notes()
    svc = micro.New("notes", **kwargs)
    svc.handle(notes)
    return svc, notes


async def test_idempotency_key_runs_once_and_replays_the_response() -> None:
    async with runtime() as rt:
        svc, notes = notes_service()
        idempotency.enable(svc)  # after handle(): the endpoints handled so far are covered
        async with svc:
            first = await call(svc, "Notes.Add", {"title": "a"}, metadata={"idempotency-key": "k1"})
            again = await call(svc, "Notes.Add", {"title": "a"}, metadata={"idempotency-key": "k1"})
            typed = await call(svc, "Notes.Add", {"title": "a"}, metadata={"idempotency-key": "k1"},
                               response_type=NoteResponse)
            other = await call(svc, "Notes.Add", {"title": "b"}, metadata={"idempotency-key": "k2"})
            plain = await call(svc, "Notes.Add", {"title": "c"})
            over_grpc = await call(svc, "Notes.Add", {"title": "a"}, metadata={"idempotency-key": "k1"},
                                   network=True)
        records = await rt.store.read(idempotency.PREFIX, prefix=True)
    assert first == again == over_grpc == {"note": {"id": "1", "title": "a"}}
    assert typed == NoteResponse(Note("1", "a"))
    assert other["note"]["id"] == "2" and plain["note"]["id"] == "3"
    assert notes.runs == 3
    assert {r.key for r in records} == {idempotency.store_key("notes", "Notes.Add", k) for k in ("k1", "k2")}
    assert all(r.expiry is not None for r in records)  # remembered for a day by default


async def test_idempotency_does_not_remember_errors_and_respects_the_endpoint_list() -> None:
    async with runtime():
        svc, notes = notes_service()
        idempotency.enable(svc, endpoints=["Notes.Add"], ttl=None)
        async with svc:
            md = {"idempotency-key": "same"}
            with pytest.raises(BadRequest):
                await call(svc, "Notes.Add", {"title": ""}, metadata=md)
            assert (await call(svc, "Notes.Add", {"title": "ok"}, metadata=md))["note"]["title"] == "ok"
            assert notes.runs == 2  # the failure was not remembered
            # Notes.List is not covered: the same key on it runs as usual
            assert (await call(svc, "Notes.List", {}, metadata=md))["total"] == 1


async def test_idempotency_concurrent_duplicates_wait_for_the_first() -> None:
    arrived = 0
    both_in = anyio.Event()
    release = anyio.Event()

    def count_arrivals(next_: Next) -> Next:
        async def handle(req: Request) -> object:
            nonlocal arrived
            arrived += 1
            if arrived == 2:
                both_in.set()
            return await next_(req)  # straight on into the idempotency wrapper, no suspension in between

        return handle

    class Slow(Notes):
        async def Add(self, req: AddRequest) -> NoteResponse:
            """Add a note, once the test says so."""
            await release.wait()
            return await super().Add(req)

    async with runtime():
        notes = Slow()
        svc = micro.New("notes", handler_wrappers=[count_arrivals])
        idempotency.enable(svc)  # before handle(): endpoints handled later are covered too
        svc.handle(notes, name="Notes")
        results: list[object] = []
        async with svc:

            async def add() -> None:
                results.append(await call(svc, "Notes.Add", {"title": "a"}, metadata={"idempotency-key": "k"}))

            async with anyio.create_task_group() as tg:
                tg.start_soon(add)
                tg.start_soon(add)
                with anyio.fail_after(10):
                    await both_in.wait()  # the second is now parked behind the first
                release.set()
    assert notes.runs == 1
    assert results == [{"note": {"id": "1", "title": "a"}}] * 2


async def test_idempotency_remembers_an_answer_whose_caller_left_while_it_was_being_stored() -> None:
    """The handler ran (its side effect happened): the answer is stored even if the caller is cancelled
    meanwhile (a crashed agent's connection), so the retry with the same key does not run it again."""
    from micro.store import Record
    from micro.store.memory import MemoryStore

    class GatedStore(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.entered = anyio.Event()
            self.gate = anyio.Event()

        async def _put(self, record: Record, if_version: int | None) -> int:
            if not self.gate.is_set():
                self.entered.set()
                await self.gate.wait()
            return await super()._put(record, if_version)

    store = GatedStore()
    async with runtime(store=store):
        svc, notes = notes_service()
        idempotency.enable(svc)
        async with svc:
            md = {"idempotency-key": "k"}

            async def first() -> None:
                await call(svc, "Notes.Add", {"title": "a"}, metadata=md)

            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                with anyio.fail_after(10):
                    await store.entered.wait()  # the handler ran; its answer is being stored
                tg.cancel_scope.cancel()  # the caller goes away
                store.gate.set()
            again = await call(svc, "Notes.Add", {"title": "a"}, metadata=md)
    assert notes.runs == 1
    assert again == {"note": {"id": "1", "title": "a"}}


async def test_idempotency_remembers_an_answer_whose_native_connection_cancelled_it_while_stored() -> None:
    """Over the native wire a caller that leaves (a CANCEL frame, or its process dying) cancels the call with
    ``Task.cancel()``, which no cancel scope shields from: the answer is still stored, and a retry with the
    same key that arrives meanwhile waits for it instead of running the handler again."""
    from micro.registry.memory import MemoryRegistry
    from micro.store import Record
    from micro.store.memory import MemoryStore

    class GatedStore(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.entered = anyio.Event()
            self.gate = anyio.Event()

        async def _put(self, record: Record, if_version: int | None) -> int:
            if not self.gate.is_set():
                self.entered.set()
                await self.gate.wait()
            return await super()._put(record, if_version)

    left = anyio.Event()

    def watch(next_: Next) -> Next:
        async def handle(req: Request) -> object:
            try:
                return await next_(req)
            except BaseException:
                left.set()  # the server cancelled the call: its caller went away
                raise

        return handle

    store = GatedStore()
    registry = MemoryRegistry()
    md = {"idempotency-key": "k"}
    async with runtime(registry=registry, store=store), runtime(registry=registry, install=False) as away:
        # the network path between two runtimes: micro's native wire
        svc, notes = notes_service(handler_wrappers=[watch])
        idempotency.enable(svc)
        async with svc:
            async def first() -> None:
                await away.client.call("notes", "Notes.Add", {"title": "a"}, metadata=md, timeout=30)

            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                with anyio.fail_after(10):
                    await store.entered.wait()  # the handler ran; its answer is being stored
                tg.cancel_scope.cancel()  # the caller goes away: its CANCEL frame cancels the handler's task
            with anyio.fail_after(10):
                await left.wait()
            results: list[object] = []

            async def again() -> None:
                results.append(await away.client.call("notes", "Notes.Add", {"title": "a"}, metadata=md, timeout=30))

            async with anyio.create_task_group() as tg:
                tg.start_soon(again)  # the retry: it waits for the answer still being stored
                store.gate.set()
    assert notes.runs == 1
    assert results == [{"note": {"id": "1", "title": "a"}}]


async def test_idempotency_current_key_in_a_handler() -> None:
    class Echo:
        async def Key(self, req: ListRequest) -> ListRequest:
            """The idempotency key of this call."""
            return ListRequest(idempotency.current_key() or "-")

    assert await call(Echo(), "Echo.Key", {}, metadata={"Idempotency-Key": "abc"}) == {"query": "abc"}
    assert await call(Echo(), "Echo.Key", {}) == {"query": "-"}
    assert context.metadata() == {}


# -- the smoke check --------------------------------------------------------------------------


class Inner(msgspec.Struct):
    n: int


class Req(msgspec.Struct):
    name: str
    when: datetime.date
    inner: Inner
    tags: list[str]
    flag: bool
    opt: str | None = None
    count: int = 3


def test_example_request_fills_the_required_fields() -> None:
    value = example_request(codec_for(Req).schema())
    assert value == {"name": "smoke", "when": "2026-01-01", "inner": {"n": 1}, "tags": [], "flag": False}
    msgspec.convert(value, Req)  # and it is a valid request


def _app(root: Path, method: str) -> Path:
    mod = f"smoke_{uuid.uuid4().hex[:8]}"  # a fresh module name: the check imports in this process
    (root / f"{mod}.py").write_text(
        "import msgspec\n"
        "from micro.errors import NotFound\n\n\n"
        "class GetRequest(msgspec.Struct):\n    id: str\n\n\n"
        "class Item(msgspec.Struct):\n    id: str\n\n\n"
        "class Items:\n"
        "    def __init__(self):\n        self.items = {'a': Item('a')}\n\n"
        + textwrap.indent(textwrap.dedent(method).strip("\n"), "    ") + "\n"
    )
    (root / "app.py").write_text(
        f"import micro\nfrom {mod} import Items\n\n"
        "items = micro.New('items')\nitems.handle(Items())\n"
        "mgr = micro.NewAgent('items-mgr', services=['items'])\n"
    )
    return root


async def test_check_app_passes_a_healthy_app(tmp_path: Path) -> None:
    app = _app(tmp_path, '''
        async def Get(self, req: GetRequest) -> Item:
            """Get an item."""
            if req.id not in self.items:
                raise NotFound("no such item")
            return self.items[req.id]
    ''')
    assert await check_app(app, require_agent=True) == []


async def test_check_app_reports_a_crashing_handler_and_a_missing_docstring(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    app = _app(tmp_path / "one", '''
        async def Get(self, req: GetRequest) -> Item:
            return self.items[req.id]
    ''')
    problems = await check_app(app)
    assert [p.stage for p in problems] == ["introspect"]
    assert "has no docstring" in problems[0].message

    app2 = _app(tmp_path / "two", '''
        async def Get(self, req: GetRequest) -> Item:
            """Get an item."""
            return self.items[req.id]
    ''')
    (problem,) = await check_app(app2)
    assert problem.stage == "call" and problem.where == "items Items.Get"
    assert "KeyError: 'smoke'" in problem.message
    assert "in Get: return self.items[req.id]" in problem.message


async def test_check_app_reports_import_errors(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("import micro\nraise RuntimeError('boom')\n")
    (problem,) = await check_app(tmp_path)
    assert problem.stage == "import"
    assert "RuntimeError: boom" in problem.message and "app.py:2" in problem.message



_PLUGIN_USER = '''
import os
from pathlib import Path

import pytest

import micro
from micro.registry.local import default_home

pytest_plugins = ["micro.testing.pytest_plugin"]


async def test_forgot_a_runtime(micro_home):
    assert Path(os.environ["MICRO_HOME"]) == micro_home == default_home()
    async with micro.New("forgetful") as svc:  # no runtime=: the loop's shared one, machine-wide registry
        assert svc.address
        assert micro_home.joinpath("registry").is_dir()  # the machine-wide registry lives in this test's home


def test_each_test_its_own(micro_home):
    assert Path(os.environ["MICRO_HOME"]) == micro_home and micro_home.name.startswith("micro-home")


@pytest.mark.micro_home_shared
def test_asks_for_the_shared_one(micro_home):
    assert os.environ["MICRO_HOME"] == os.environ["OUTER_HOME"] and str(micro_home) == os.environ["OUTER_HOME"]
'''


def test_plugin_gives_each_test_its_own_micro_home(tmp_path: Path) -> None:
    """Under the plugin a test that forgets a runtime writes nowhere near the process's MICRO_HOME."""
    outer = tmp_path / "outer-home"
    outer.mkdir()
    (tmp_path / "test_user.py").write_text(_PLUGIN_USER)
    env = {**os.environ, "MICRO_HOME": str(outer), "OUTER_HOME": str(outer)}
    env.pop("PYTEST_ADDOPTS", None)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "asyncio_mode=auto",
         "--rootdir", str(tmp_path), str(tmp_path / "test_user.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 passed" in run.stdout
    assert list(outer.iterdir()) == []  # nothing was written under the process's MICRO_HOME

"""The public API: a sorted ``__all__`` with nothing public by accident, and the Go-style
facade helpers folding into real keyword arguments of the constructors they feed."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import micro
from micro import facade
from micro.errors import UsageError


def test_all_is_sorted_and_complete() -> None:
    assert micro.__all__ == sorted(micro.__all__)
    assert len(set(micro.__all__)) == len(micro.__all__)
    for name in micro.__all__:
        assert hasattr(micro, name), name
    public = {n for n in dir(micro) if not n.startswith("_")
              and not isinstance(getattr(micro, n), types.ModuleType)}
    assert public <= set(micro.__all__), f"public by accident: {sorted(public - set(micro.__all__))}"


def test_the_everyday_names_are_there() -> None:
    for name in ("New", "NewService", "Service", "Runtime", "Client", "Version", "Address",
                 "Metadata", "RegisterTTL", "Option", "errors"):
        assert name in micro.__all__, name
    assert micro.New is micro.NewService
    assert micro.errors.BadRequest.status.name == "INVALID_ARGUMENT"


def _helpers() -> Iterator[tuple[str, Callable[..., facade.Option]]]:
    """Every option helper of the facade: the functions that return an ``Option``."""
    for name, fn in sorted(vars(facade).items()):
        if (inspect.isfunction(fn) and fn.__module__ == facade.__name__
                and not name.startswith("_") and fn.__annotations__.get("return") == "Option"):
            yield name, fn


def _target(helper: str) -> type:
    """The constructor a helper feeds, by the facade's naming (AgentX -> Agent, FlowX -> Flow)."""
    for prefix in ("Agent", "Flow"):
        if helper.startswith(prefix) and hasattr(micro, prefix):
            cls: type = getattr(micro, prefix)
            return cls
    return micro.Service


_SAMPLES: dict[str, Any] = {"str": "x", "float": 1.5, "int": 3, "bool": True,
                            "Mapping[str, str]": {"k": "v"}, "dict[str, str]": {"k": "v"}}


def _call(fn: Callable[..., facade.Option]) -> facade.Option:
    args: list[Any] = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            args.extend(["a", "b"])
        else:
            assert p.annotation in _SAMPLES, f"{fn.__name__}: add a sample for {p.annotation}"
            args.append(_SAMPLES[p.annotation])
    return fn(*args)


HELPERS = list(_helpers())


def test_there_are_service_helpers() -> None:
    names = {n for n, _ in HELPERS}
    assert {"Version", "Address", "Metadata", "RegisterTTL"} <= names


@pytest.mark.parametrize(("name", "helper"), HELPERS, ids=[n for n, _ in HELPERS])
def test_each_helper_names_a_keyword_of_its_constructor(
    name: str, helper: Callable[..., facade.Option]
) -> None:
    option = _call(helper)
    assert isinstance(option, facade.Option) and len(option) == 1
    target = _target(name)
    params = inspect.signature(target).parameters
    (key,) = option
    assert key in params, f"micro.{name} sets {key}=, which {target.__name__}() does not take"
    assert params[key].kind in (inspect.Parameter.KEYWORD_ONLY,
                                inspect.Parameter.POSITIONAL_OR_KEYWORD)


def test_service_helpers_fold_into_service_keywords() -> None:
    service = micro.New("task", micro.Version("1.2.0"), micro.Address("127.0.0.1:0"),
                        micro.Metadata({"team": "core"}), micro.RegisterTTL(9.0))
    assert isinstance(service, micro.Service)
    assert service.version == "1.2.0"
    assert service.metadata == {"team": "core"}
    assert service.ttl == 9.0 and service.heartbeat == 3.0
    # keyword arguments win over options, and read the same
    assert micro.New("task", micro.Version("1"), version="2").version == "2"
    assert micro.NewService("task", version="3").version == "3"


def test_new_takes_every_service_keyword() -> None:
    new = inspect.signature(micro.New).parameters
    assert any(p.kind is p.VAR_KEYWORD for p in new.values())
    service = inspect.signature(micro.Service).parameters
    kwargs = {"version": "1", "address": "127.0.0.1:0", "metadata": {}, "ttl": 5.0,
              "heartbeat": 1.0, "handler_wrappers": [], "max_message_size": 1024,
              "drain_timeout": 1.0}
    assert set(kwargs) <= set(service)
    assert micro.New("task", **kwargs).ttl == 5.0


def test_options_must_be_options() -> None:
    with pytest.raises(TypeError, match=r"micro\.Version"):
        micro.New("task", {"version": "1"})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        micro.New("task", micro.Option(no_such_option=1))
    with pytest.raises(UsageError):
        micro.New("bad name")


def _keywords(cls: type) -> set[str]:
    params = inspect.signature(cls).parameters.values()
    return {p.name for p in params if p.kind is p.KEYWORD_ONLY}


def test_the_go_style_aliases_are_typed_from_their_classes() -> None:
    """``micro.New``/``NewAgent``/``NewFlow`` take exactly their class's keywords, typed (a typo is a mypy
    error, not ``**kwargs: Any``); Agent and Flow pass the rest on to Service through typed dicts too."""
    from micro.service import AgentServiceOptions, ServiceOptions

    service = _keywords(micro.Service)
    assert set(facade.NewServiceOptions.__annotations__) | set(AgentServiceOptions.__annotations__) \
        | set(ServiceOptions.__annotations__) == service
    assert facade.NewServiceOptions.__optional_keys__ == service
    assert facade.NewAgentOptions.__optional_keys__ == _keywords(micro.Agent) | (service - {"metadata"})
    flow_own = {"metadata", "max_concurrency"}
    assert facade.NewFlowOptions.__optional_keys__ == _keywords(micro.Flow) | (service - flow_own)
    assert AgentServiceOptions.__optional_keys__ == service - {"metadata"}
    for alias, options in ((micro.New, facade.NewServiceOptions), (micro.NewAgent, facade.NewAgentOptions),
                           (micro.NewFlow, facade.NewFlowOptions)):
        kwargs = inspect.signature(alias).parameters["kwargs"]
        assert kwargs.annotation == f"Unpack[{options.__name__}]", alias
    for cls in (micro.Agent, micro.Flow):
        rest = [p for p in inspect.signature(cls).parameters.values() if p.kind is p.VAR_KEYWORD]
        assert [p.annotation for p in rest] in (["Unpack[AgentServiceOptions]"], ["Unpack[ServiceOptions]"]), cls

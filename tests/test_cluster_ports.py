"""Stable port assignment: identity keeps its port, departures rest, a full range is reported."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from proxy.cluster.ports import PortBook, StateFile, canonical, preferred_port


def test_nodes_get_their_preferred_ports_whatever_the_order_they_are_listed_in() -> None:
    book = PortBook(6380, 6389, grace=60)
    changes = book.assign(["c", "a", "b"], now=0)
    assert changes.added == canonical(["a", "b", "c"], 6380, 6389)
    assert len(set(changes.added.values())) == 3
    assert book.assign(["a", "b", "c"], now=1).empty
    # The hash ignores the range's position: a wide range leaves each node its own port.
    wide = canonical(["a", "b", "c"], 7000, 7999)
    assert wide == {i: preferred_port(i, 7000, 7999) for i in "abc"}


def test_collisions_go_to_the_next_free_port_in_a_fixed_order() -> None:
    # A two-port range: at most two preferences, so collisions are certain with three.
    ids = ["n1", "n2", "n3", "n4"]
    one = canonical(ids[:2], 6380, 6381)
    assert sorted(one.values()) == [6380, 6381]
    assert canonical(list(reversed(ids[:2])), 6380, 6381) == one


def test_a_node_keeps_its_port_whatever_else_comes_and_goes() -> None:
    book = PortBook(6380, 6389, grace=60)
    book.assign(["a", "b", "c"], now=0)
    before = dict(book.assigned)
    changes = book.assign(["c", "d"], now=1)
    assert changes.retired == {"a": before["a"], "b": before["b"]}
    assert changes.added["d"] not in (before["a"], before["b"], before["c"])  # they rest
    assert book.port_of("c") == before["c"]


def test_a_departed_nodes_port_rests_for_the_grace_period_then_is_reused() -> None:
    book = PortBook(6380, 6381, grace=60)
    book.assign(["a", "b"], now=0)
    a_port = book.port_of("a")
    book.assign(["b"], now=10)
    assert book.assign(["b", "x"], now=69).unassigned == ("x",)  # a's port still rests
    assert book.assign(["b", "x"], now=70).added == {"x": a_port}


def test_a_node_back_within_the_grace_period_gets_its_own_port() -> None:
    book = PortBook(6380, 6389, grace=60)
    book.assign(["a", "b"], now=0)
    a_port = book.port_of("a")
    book.assign(["b"], now=1)
    book.assign(["b", "z"], now=2)  # z must not take a's resting port
    assert book.port_of("z") != a_port
    assert book.assign(["a", "b", "z"], now=3).added == {"a": a_port}
    assert not book.retired


def test_a_full_range_leaves_existing_nodes_alone_and_names_the_rest() -> None:
    book = PortBook(6380, 6381, grace=0)
    book.assign(["a", "b"], now=0)
    before = dict(book.assigned)
    changes = book.assign(["a", "b", "c", "d"], now=1)
    assert changes.unassigned == ("c", "d") and not changes.added
    assert book.assigned == before
    book.assign(["b", "c", "d"], now=2)  # a left; no grace: c or d takes its port at once
    assert book.port_of("b") == before["b"]
    assert set(book.assigned.values()) == {6380, 6381}


def test_a_narrower_range_moves_only_the_nodes_outside_it() -> None:
    book = PortBook(6380, 6389, grace=60)
    book.assign(["a", "b", "c"], now=0)
    before = dict(book.assigned)
    book.low, book.high = before["c"] + 1, 6399
    changes = book.assign(["a", "b", "c"], now=1)
    assert "c" in changes.added and book.port_of("c") > before["c"]
    for i in "ab":
        assert (i in changes.added) == (before[i] <= before["c"])


def test_hosts_with_different_histories_disagree_only_where_off_canonical_says() -> None:
    ids = [f"node-{n}" for n in range(8)]
    fresh = PortBook(7000, 7007, grace=600)  # a full range: every collision probes
    fresh.assign(ids[2:], now=100)
    old = PortBook(7000, 7007, grace=600)  # saw node-0 and node-1 come and go
    old.assign(ids, now=0)
    old.assign(ids[2:], now=1)
    differs = {i for i in ids[2:] if old.port_of(i) != fresh.port_of(i)}
    assert fresh.off_canonical() == {}
    assert set(old.off_canonical()) == differs
    for i, (port, want) in old.off_canonical().items():
        assert port == old.port_of(i) and want == fresh.port_of(i)


def test_the_book_survives_a_round_trip_through_json_and_drops_junk() -> None:
    book = PortBook(6380, 6389, grace=60)
    book.assign(["a", "b"], now=0)
    book.assign(["b"], now=1)
    again = PortBook(6380, 6389, grace=60)
    again.load_json(json.loads(json.dumps(book.to_json())))
    assert again.assigned == book.assigned and again.retired == book.retired
    again.load_json({"assigned": {"x": "6380", "y": 6381, "z": 6381, "t": True},
                     "retired": {"nope": {}, "6385": {"id": "q", "until": 9}}})
    assert again.assigned == {"y": 6381}
    assert set(again.retired) == {6385}
    again.load_json(["not", "a", "mapping"])
    assert not again.assigned



def test_reservations_made_since_the_file_was_read_survive_where_their_port_is_free() -> None:
    book = PortBook(6380, 6389, grace=60)
    mine = book.reserve("new")
    assert mine is not None
    # Another worker wrote the file meanwhile: "other" took a port, "gone" retired one.
    others = {"assigned": {"other": 6389 if mine != 6389 else 6388},
              "retired": {str(6388 if mine != 6388 else 6387): {"id": "gone", "until": 9}}}
    book.load_json(others)
    book.keep_reserved({"new": mine})
    assert book.port_of("new") == mine
    # A reservation whose port the file gave away meanwhile is not put back.
    book.load_json({"assigned": {"other": mine}})
    book.keep_reserved({"new": mine})
    assert book.port_of("new") is None and book.port_of("other") == mine

def _assign_in_process(path: str, identities: list[str], out: multiprocessing.Queue[str]) -> None:
    state = StateFile(path)
    book = PortBook(7000, 7099, grace=60)

    def change(entry: dict[str, object]) -> dict[str, object]:
        book.load_json(entry.get("ports"))
        book.assign(identities, now=0)
        return {**entry, "ports": book.to_json()}

    state.update_cluster("c", change)
    out.put(json.dumps(book.assigned, sort_keys=True))


def test_workers_sharing_a_state_file_agree_on_every_port(tmp_path: Path) -> None:
    path = str(tmp_path / "state" / "cacheport-state.json")
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[str] = ctx.Queue()
    # Each worker sees the nodes in a different order, and some see one more node.
    orders = [[f"n{i}" for i in range(30)], [f"n{i}" for i in reversed(range(31))]] * 3
    procs = [ctx.Process(target=_assign_in_process, args=(path, ids, out)) for ids in orders]
    for p in procs:
        p.start()
    for p in procs:
        p.join(20)
        assert p.exitcode == 0
    book = json.loads(Path(path).read_text())["clusters"]["c"]["ports"]
    # A worker that saw only 30 nodes may have written last: n30 is then retired, its port
    # still held for it. Either way every node has one port, and all workers agree.
    final = dict(book["assigned"])
    final.update({entry["id"]: int(port) for port, entry in book["retired"].items()})
    assert len(final) == 31 and len(set(final.values())) == 31
    for _ in procs:
        seen = json.loads(out.get(timeout=5))
        assert all(final[k] == v for k, v in seen.items())


def test_a_corrupt_state_file_is_replaced_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text("{not json")
    state = StateFile(str(path))
    assert state.read_cluster("c") == {}
    state.update_cluster("c", lambda entry: {**entry, "ports": {"assigned": {"a": 1}}})
    assert state.read_cluster("c") == {"ports": {"assigned": {"a": 1}}}

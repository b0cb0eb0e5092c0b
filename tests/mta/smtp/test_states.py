"""states.py's rule 1 (every transition is its data) checked on server.py, and its guard."""

import ast
from pathlib import Path

import pytest

from mta.smtp import server, states
from mta.smtp.states import State, Step

TABLE_FUNCTIONS = {"after", "after_positive"}


def _state_assignments() -> list[tuple[str, ast.expr]]:
    tree = ast.parse(Path(server.__file__).read_text())
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        for node in ast.walk(function):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Attribute) and t.attr == "state" for t in targets):
                    assert node.value is not None
                    found.append((function.name, node.value))
    return found


def test_server_changes_its_state_only_through_the_tables() -> None:
    assignments = _state_assignments()
    assert len(assignments) > 10
    for function, value in assignments:
        if function == "__init__":
            assert ast.unparse(value) == "State.CONNECTED"
            continue
        assert (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
                and ast.unparse(value.func.value) == "states" and value.func.attr in TABLE_FUNCTIONS), \
            f"{function}: self.state = {ast.unparse(value)}"


def test_a_step_its_row_does_not_list_is_our_bug() -> None:
    with pytest.raises(RuntimeError, match="no greeting from ready"):
        states.after(State.READY, Step.GREETING)
    with pytest.raises(RuntimeError, match="no message_done from mail"):
        states.after(State.MAIL, Step.MESSAGE_DONE)
    assert all(states.after(state, Step.CLOSE) is State.CLOSED for state in State)

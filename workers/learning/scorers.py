"""Scoring an answer without running it: reasoning-gym's scorers, less the ones that would evaluate text.

Every answer is model text, and a peer's is whatever the peer wrote. Several reasoning-gym scorers hand the
answer to eval() or to sympy's parse_expr (itself an eval), so `<answer>__import__('os').system(...)</answer>`
would run here. Those tasks get a scorer of ours below that reads Python literals only and gives
reasoning-gym's score on every answer that is a literal, or they are refused when TASKS is checked.
"""

import ast
import warnings
from typing import Any, Callable

import reasoning_gym
from reasoning_gym.logic.propositional_logic import Expression, parse_expr

Scorer = Callable[[str | None, dict[str, Any]], float]

# Their reasoning-gym scorers parse the answer with sympy's parse_expr, which evals it: no literal-only reading
# scores arithmetic or algebra the same way, so these tasks are not played.
REFUSED: dict[str, str] = {
    task: "reasoning-gym scores it by evaluating the answer with sympy's parse_expr (Python eval), so a "
          "completion could run code"
    for task in ("countdown", "puzzle24", "polynomial_multiplication", "simple_integration",
                 "intermediate_integration")
}
# Their reasoning-gym scorers eval() only the question's own answer or problem, never the model's answer; a
# worker builds every question itself (a peer names one by task, seed and index), so no peer text gets there.
EVALS_OWN_QUESTION_ONLY = ("bitwise_arithmetic", "number_sorting")

MAX_LOGIC_ANSWER = 128       # characters; reasoning-gym's conclusions are under 10
MAX_LOGIC_VARIABLES = 12     # its truth table has 2**variables rows


class _NotLiteral:
    """What an answer that spells no Python literal (code included) reads as."""


def _literal(answer: str) -> Any:
    """What eval(answer) gives when the answer is a Python literal (list, string, number...); _NotLiteral otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)     # "\d" in model text: a warning, not an error
            return ast.literal_eval(answer)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NotLiteral


def _rendered(answer: str, render: Callable[[Any], str]) -> str | None:
    """render(the literal the answer spells), as reasoning-gym renders eval(answer); None where it fails."""
    value = _literal(answer)
    if value is _NotLiteral:
        return None
    try:
        return render(value)
    except (TypeError, ValueError):         # not rows of cells: no partial credit, as reasoning-gym's except gives
        return None


def _grid(rows: Any) -> str:
    return "\n".join(" ".join(str(cell) for cell in row) for row in rows)


def score_binary_matrix(answer: str | None, entry: dict[str, Any]) -> float:
    """1.0 for the matrix as text, 0.1 for it as a Python list of rows (reasoning-gym: eval(answer))."""
    oracle = entry["answer"]
    if answer is None:
        return 0.0
    if answer == oracle:
        return 1.0
    return 0.1 if _rendered(answer, _grid) == oracle else 0.0


def score_spiral_matrix(answer: str | None, entry: dict[str, Any]) -> float:
    """1.0 for the spiral order as text, 0.1 for it as a Python list (reasoning-gym: eval(answer))."""
    oracle = entry["answer"].strip()
    if not answer:
        return 0.0
    answer = answer.strip()
    if answer == oracle:
        return 1.0
    return 0.1 if _rendered(answer, lambda items: " ".join(str(item) for item in items)) == oracle else 0.0


def score_string_insertion(answer: str | None, entry: dict[str, Any]) -> float:
    """1.0 for the string, 0.1 for it as a Python list of characters (reasoning-gym: eval(answer))."""
    oracle = entry["answer"]
    if not isinstance(answer, str):
        return 0.0
    if answer == oracle:
        return 1.0
    return 0.1 if _rendered(answer, "".join) == oracle else 0.0


def score_n_queens(answer: str | None, entry: dict[str, Any]) -> float:
    """1.0 for a valid board as text, 0.5 for one as a Python list of rows (reasoning-gym: eval(answer))."""
    if not isinstance(answer, str):
        return 0.0
    valid = entry["metadata"]["valid_answers"]
    if answer in valid:
        return 1.0
    board = _rendered(answer, lambda rows: "\n".join(" ".join(cell for cell in row) for row in rows))
    return 0.5 if board is not None and board in valid else 0.0


def _names(expression: Expression) -> set[str]:
    if expression.operator is None:
        return {expression.left}
    return _names(expression.left) | (_names(expression.right) if expression.right is not None else set())


def score_propositional_logic(answer: str | None, entry: dict[str, Any]) -> float:
    """reasoning-gym's scorer, on answers it can check in bounded time; 0 for the others.

    It checks a conclusion on every row of a truth table over all the names in it, and lower-case names pass
    its variable check: `a1 ∨ a2 ∨ ... ∨ a40` would build 2**40 rows. Its parser recurses once per operator.
    """
    if isinstance(answer, str):
        if len(answer) > MAX_LOGIC_ANSWER:
            return 0.0
        try:
            names = _names(parse_expr(answer))
        except ValueError:                   # no expression: reasoning-gym's scorer gives 0 on its own
            names = set()
        if len(names | set(entry["metadata"]["variables"])) > MAX_LOGIC_VARIABLES:
            return 0.0
    return reasoning_gym_scorer("propositional_logic")(answer, entry)


SAFE_SCORERS: dict[str, Scorer] = {
    "binary_matrix": score_binary_matrix,
    "spiral_matrix": score_spiral_matrix,
    "string_insertion": score_string_insertion,
    "n_queens": score_n_queens,
    "propositional_logic": score_propositional_logic,
}
_reasoning_gym: dict[str, Scorer] = {}


def reasoning_gym_scorer(task: str) -> Scorer:
    """reasoning-gym's own scorer of a task (built once: it builds a dataset)."""
    if task not in _reasoning_gym:
        _reasoning_gym[task] = reasoning_gym.get_score_answer_fn(task)
    return _reasoning_gym[task]


def scorer_for(task: str) -> Scorer:
    """Ours where reasoning-gym's would evaluate the answer, reasoning-gym's otherwise; KeyError for a refused task."""
    if task in REFUSED:
        raise KeyError(f"{task}: {REFUSED[task]}")
    return SAFE_SCORERS.get(task) or reasoning_gym_scorer(task)

"""
The calculator tool the chat model calls between <|python_start|> and <|python_end|>.

    use_calculator("12*3")          # "36"
    use_calculator("'strawberry'.count('r')")   # "3"
    use_calculator("__import__('os')")          # None: refused

Arithmetic on int/float literals (+ - * / // % **, unary +/-) and "literal".count("literal"),
parsed with `ast` and walked by hand: never eval. Work is bounded by checks before each
operation (integer size, exponent, expression length), so no timer or signal is needed and any
thread may call it. A refused or failing expression answers None.
"""

from __future__ import annotations

import ast
import math

MAX_EXPR_CHARS = 256
MAX_INT_BITS = 256  # integers (inputs, intermediate results) beyond ~77 digits are refused
MAX_EXPONENT = 1024
MAX_RESULT_CHARS = 80


class _Refused(Exception):
    pass


def _bounded(x):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise _Refused
    if isinstance(x, int) and x.bit_length() > MAX_INT_BITS:
        raise _Refused
    if isinstance(x, float) and not math.isfinite(x):
        raise _Refused
    return x


def _binop(op: ast.operator, a, b):
    if isinstance(op, ast.Add):
        return _bounded(a + b)
    if isinstance(op, ast.Sub):
        return _bounded(a - b)
    if isinstance(op, ast.Mult):
        if isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:
            raise _Refused  # refuse before computing: big-int work is unbounded
        return _bounded(a * b)
    if isinstance(op, (ast.Div, ast.FloorDiv, ast.Mod)):
        if b == 0:
            raise _Refused
        if isinstance(op, ast.Div):
            return _bounded(a / b)
        return _bounded(a // b if isinstance(op, ast.FloorDiv) else a % b)
    if isinstance(op, ast.Pow):
        if abs(b) > MAX_EXPONENT:
            raise _Refused
        if isinstance(a, int) and isinstance(b, int) and b > 0 and (a.bit_length() - 1) * b > MAX_INT_BITS:
            raise _Refused  # |a|**b has at least that many bits: refuse before computing it
        return _bounded(a**b)  # a complex result (negative base, fractional power) is refused too
    raise _Refused


def _evaluate(node: ast.AST):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        return _bounded(node.value)  # strings only appear inside .count(), handled below
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand)
        return value if isinstance(node.op, ast.UAdd) else -value
    if isinstance(node, ast.BinOp):
        return _binop(node.op, _evaluate(node.left), _evaluate(node.right))
    if (  # "literal".count("literal"), nothing else callable
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "count"
        and isinstance(node.func.value, ast.Constant)
        and type(node.func.value.value) is str
        and len(node.args) == 1
        and not node.keywords
        and isinstance(node.args[0], ast.Constant)
        and type(node.args[0].value) is str
    ):
        return node.func.value.value.count(node.args[0].value)
    raise _Refused


def use_calculator(expr: str) -> str | None:
    """The value of a small arithmetic / "str".count("x") expression as a short string; None if refused."""
    if len(expr) > MAX_EXPR_CHARS:
        return None
    expr = expr.strip()
    if "'" not in expr and '"' not in expr:
        expr = expr.replace(",", "")  # thousands separators: "1,234 * 2"
    try:
        x = _evaluate(ast.parse(expr, mode="eval"))
    except Exception:  # syntax errors, refusals, overflow, deep nesting: the tool just answers nothing
        return None
    if isinstance(x, float):  # ints print without ".0", other floats with 10 significant digits
        text = str(int(x)) if x == int(x) and abs(x) < 1e15 else f"{x:.10g}"
    else:
        text = str(x)
    return text if len(text) <= MAX_RESULT_CHARS else None

"""
The calculator tool the chat model calls between <|python_start|> and <|python_end|>.

    use_calculator("12*3")                      # "36"
    use_calculator("'strawberry'.count('r')")   # "3"
    use_calculator("__import__('os')")          # None: refused

Arithmetic on int/float literals and "literal".count("literal"), parsed with `ast` and walked by
hand: never eval. Sizes are checked before each operation, so no timer is needed and any thread
may call it.
"""

from __future__ import annotations

import ast
import math
import operator

MAX_EXPR_CHARS = 256
MAX_INT_BITS = 256  # integers (inputs, intermediate results) beyond ~77 digits are refused
MAX_EXPONENT = 1024
MAX_RESULT_CHARS = 80
OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def _bounded(x):
    """x, if it is a number the calculator deals in; else ValueError (refused)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):  # a complex power, a string, True
        raise ValueError(x)
    if (isinstance(x, int) and x.bit_length() > MAX_INT_BITS) or (
        isinstance(x, float) and not math.isfinite(x)
    ):
        raise ValueError(x)
    return x


def _evaluate(node: ast.AST):
    if isinstance(node, ast.Constant):
        return _bounded(node.value)  # strings only appear inside .count(), handled below
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand)
        return value if isinstance(node.op, ast.UAdd) else -value
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        a, b = _evaluate(node.left), _evaluate(node.right)
        # refuse before computing: big-int work is unbounded (|a|**b has at least (bits(a)-1)*b bits)
        if isinstance(a, int) and isinstance(b, int):
            if isinstance(node.op, ast.Mult) and a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:
                raise ValueError("product too large")
            if isinstance(node.op, ast.Pow) and b > 0 and (a.bit_length() - 1) * b > MAX_INT_BITS:
                raise ValueError("power too large")
        if isinstance(node.op, ast.Pow) and abs(b) > MAX_EXPONENT:
            raise ValueError("exponent too large")
        return _bounded(OPERATORS[type(node.op)](a, b))  # division by 0 raises: refused
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
    raise ValueError("not allowed")


def use_calculator(expr: str) -> str | None:
    """The value of a small arithmetic / "str".count("x") expression as a short string; None if refused."""
    if len(expr) > MAX_EXPR_CHARS:
        return None
    expr = expr.strip()
    if "'" not in expr and '"' not in expr:
        expr = expr.replace(",", "")  # thousands separators: "1,234 * 2"
    try:
        x = _evaluate(ast.parse(expr, mode="eval").body)
    except Exception:  # syntax errors, refusals, overflow, deep nesting: the tool just answers nothing
        return None
    if isinstance(x, float):  # ints print without ".0", other floats with 10 significant digits
        text = str(int(x)) if x == int(x) and abs(x) < 1e15 else f"{x:.10g}"
    else:
        text = str(x)
    return text if len(text) <= MAX_RESULT_CHARS else None

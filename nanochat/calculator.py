"""The calculator tool the chat model calls between <|python_start|> and <|python_end|>: arithmetic on
int/float literals and "literal".count("literal"), parsed with `ast` and walked by hand, never eval.
Sizes are checked before each operation, so no timer is needed and any thread may call it.
"""

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
    if x.bit_length() > MAX_INT_BITS if isinstance(x, int) else not math.isfinite(x):
        raise ValueError(x)
    return x


def _evaluate(node: ast.AST):
    match node:
        case ast.Constant(value=value):
            return _bounded(value)  # strings only appear inside .count(), matched below
        case ast.UnaryOp(op=ast.UAdd() | ast.USub() as op, operand=operand):
            value = _evaluate(operand)
            return -value if isinstance(op, ast.USub) else value
        case ast.BinOp(left=left, op=op, right=right) if type(op) in OPERATORS:
            a, b = _evaluate(left), _evaluate(right)
            # refuse before computing: big-int work is unbounded (|a|**b has at least (bits(a)-1)*b bits)
            if isinstance(a, int) and isinstance(b, int):
                if isinstance(op, ast.Mult) and a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:
                    raise ValueError("product too large")
                if isinstance(op, ast.Pow) and b > 0 and (a.bit_length() - 1) * b > MAX_INT_BITS:
                    raise ValueError("power too large")
            if isinstance(op, ast.Pow) and abs(b) > MAX_EXPONENT:
                raise ValueError("exponent too large")
            return _bounded(OPERATORS[type(op)](a, b))  # division by 0 raises: refused
        case ast.Call(  # "literal".count("literal"), nothing else callable
            func=ast.Attribute(value=ast.Constant(value=str(text)), attr="count"),
            args=[ast.Constant(value=str(sub))],
            keywords=[],
        ):
            return text.count(sub)
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
    if isinstance(x, float):  # whole floats print without ".0", others with 10 significant digits
        x = int(x) if x == int(x) and abs(x) < 1e15 else f"{x:.10g}"
    text = str(x)
    return text if len(text) <= MAX_RESULT_CHARS else None

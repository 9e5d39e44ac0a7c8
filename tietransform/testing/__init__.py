"""Tools for users' own test suites: check that a tied function matches its untied reference.

`tietransform.testing.strategies` adds hypothesis strategies for tied pytrees (it needs the
`hypothesis` package; this module does not).
"""

from ._check import (
    TieCheckError as TieCheckError,
    check_tied as check_tied,
    expected_packed_grads as expected_packed_grads,
    tolerance as tolerance,
    tree_allclose as tree_allclose,
)

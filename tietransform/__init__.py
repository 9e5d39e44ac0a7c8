"""tietransform: declarative weight tying for JAX, as a function transformation."""

from ._describe import describe as describe
from ._errors import (
    StackMaterialisedWarning as StackMaterialisedWarning,
    UnreadMemberWarning as UnreadMemberWarning,
)
from ._ffn_routing import RoutedFFN as RoutedFFN, ffn_routing_report as ffn_routing_report
from ._grads import unpack_grads as unpack_grads
from ._labels import pack_labels as pack_labels
from ._pack import pack as pack, unpack as unpack
from ._placeholders import (
    RelaxedLeaf as RelaxedLeaf,
    StackedLeaf as StackedLeaf,
    TiedLeaf as TiedLeaf,
)
from ._serialise import (
    orbax_restore as orbax_restore,
    tree_deserialise_leaves as tree_deserialise_leaves,
)
from ._spec import (
    Group as Group,
    Relaxed as Relaxed,
    Stack as Stack,
    TieSpec as TieSpec,
    View as View,
    group as group,
    relaxed as relaxed,
    stack as stack,
    view as view,
)
from ._strategies import layer_blocks as layer_blocks, share_layers as share_layers
from ._tie import tie as tie


__version__ = "0.1.0"

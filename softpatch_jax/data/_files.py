"""TEMPORARY alias of `softpatch_jax.data.files` for engine.py and
predict_files.py until they import `data.files`; delete with engine.py."""

from softpatch_jax.data.files import IMAGE_EXTENSIONS  # noqa: F401
from softpatch_jax.data.files import is_image  # noqa: F401
from softpatch_jax.data.files import is_symlink_loop  # noqa: F401
from softpatch_jax.data.files import list_images  # noqa: F401
from softpatch_jax.data.files import unreadable_message  # noqa: F401

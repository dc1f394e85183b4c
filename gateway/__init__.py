"""Sandman, the GPU SSH gateway."""

import warnings

# asyncssh (2.24 and before) touches cryptography's DSA classes at import, which cryptography
# 43+ marks deprecated: five CryptographyDeprecationWarning blocks at every start, about
# nothing the gateway uses (it never offers or accepts DSA keys).
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"asyncssh\.")

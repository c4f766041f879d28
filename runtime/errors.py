"""The one user-facing error type, shared by every package.

It lives in the runtime because the runtime is the dependency-free base that every other
package may import. Anything raised as ``UserError`` is printed by the CLI as one line
(``error: ...``) with exit code 2; anything else is a bug and shows a traceback.
"""


class UserError(Exception):
    """Bad input, a missing file, an impossible setting: something the user can fix.

    The message names the problem and, where there is one, the fix.
    """

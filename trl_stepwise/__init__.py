"""Stepwise RL for math word problems on top of TRL.

Importing the package installs narrow filters for third-party notices it triggers (see ``trl_stepwise.quiet``) before
any of those libraries is imported.
"""

from trl_stepwise.quiet import quiet_third_party

quiet_third_party()

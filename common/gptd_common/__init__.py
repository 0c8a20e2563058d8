"""Pure code both gptd packages import (stdlib only): the operator image ships gptd_operator + gptd_common, the
runtime image gptd_runtime + gptd_common, so neither needs the other's dependencies (torch, kopf)."""

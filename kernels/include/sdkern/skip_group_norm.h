// SkipGroupNorm shares GroupNormArgs and its launchers with GroupNorm (see group_norm.h):
// s = x + skip + bias; y = GroupNorm(s) (+SiLU).
#pragma once

#include "sdkern/group_norm.h"

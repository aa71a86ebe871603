// Force-included before everything: makes CUDA kernel source compile as host C++ so its blocks
// can be run by emu.h with one fiber per CUDA thread.
#pragma once
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __DEVICE_LAUNCH_PARAMETERS_H__

// SPDX-License-Identifier: Apache-2.0
/// \file dit.hpp
/// \brief The Diffusion Transformer and its diffusion machinery: dit_model (dense or MoE
/// MLPs), rectified-flow and DDPM objectives, Euler / DDPM / DDIM samplers, classifier-free
/// guidance. Builds on <promoe/promoe.hpp>.
#pragma once

#include "dit/config.hpp"
#include "dit/guidance.hpp"
#include "dit/inference_model.hpp"
#include "dit/model.hpp"
#include "dit/objective.hpp"
#include "dit/sampler.hpp"
#include "promoe.hpp"

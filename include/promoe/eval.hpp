// SPDX-License-Identifier: Apache-2.0
/// \file eval.hpp
/// \brief Sample evaluation (promoe-evaluate): the images to evaluate (eval::image_set), the
/// feature classifier (eval::feature_net, its training and checkpoint), the Fréchet distance
/// of Gaussians fitted to features (eval::frechet_distance) and improved precision / recall
/// (eval::precision_recall).
#pragma once

#include "eval/feature_net.hpp"
#include "eval/frechet.hpp"
#include "eval/images.hpp"
#include "eval/precision_recall.hpp"
#include "eval/train_feature_net.hpp"

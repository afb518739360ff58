// Snapshots of sequences: cache::export_sequences / cache::import_sequences.
//
// Format version 3 (little-endian; "str" is u32 length + bytes):
//   magic "KVLSNAP1" | u32 version (3)
//   u32 dtype (0 fp32, 1 fp16, 2 bf16) | u32 head_dim | u32 block_size | u32 n_layers | u32 n_kv_heads
//   i32 layer_store[n_layers]                       (CLA: the layer each layer reads)
//   u32 n_plans, per plan: str name,
//       u32 n, n x (str key, f64 value) | u32 n, n x (str key, u32 len, i32[len]) | u32 n, n x (str key, str)
//   u64 n_blocks                                    (distinct blocks: forks share theirs)
//   u32 n_seqs, per sequence: i64 id, then per owner layer (layer_store[l] == l) and kv head:
//       i64 appended | u32 plan (index, or 0xffffffff: none) | u32 n_table | i64 table[n_table]
//       (-1: hole, else a block index) | per slot of the table's blocks (holes have none:
//       n_held x block_size slots, table order): u8 live[], i32 ord[], i32 pos[], f32 score[], u8 class[]
//   n_blocks x (keys [block_size][head_dim], values [block_size][head_dim]) in the storage dtype,
//       rows live in no head written as zeros
//   magic "KVLSEND1"
//
// Version 5 (a cache with quantized storage, cache::set_quantized) differs in three places:
//   u32 quant_bits follows n_kv_heads; u64 n_sealed follows n_blocks; a table entry <= -2 names
//   sealed block -(entry + 2); after the full-precision blocks come n_sealed quantized blocks
//   of quant_layout::bytes each (kvloom/quant.h), the codes and value scales of rows live in no
//   head written as zeros (the key scales are the block's: they were computed when it sealed).
// Versions 1 and 2 (read, no longer written) are 3 and 4 with slot metadata for the holes too
// (n_table x block_size slots). Version 4 (read, no longer written) is 5 with 2-bit blocks in the
// first 2-bit layout (value groups of 32, no refits): its 8- and 4-bit blocks load, 2-bit ones
// are refused. A float blob (1, 3) loads into a quantized cache too (its blocks
// are all full precision).
//
// The importer reads the whole blob and checks every count, index and value against the
// bytes present and against this cache (geometry, layer sharing, plans re-made by name)
// before it allocates anything; then it takes every block at once (all or nothing) and only
// then links the sequences in. A blob that is truncated, corrupted or made for another
// geometry raises std::invalid_argument naming what is wrong and changes nothing.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "device.h"
#include "head_store.h"
#include "kvloom/cache.h"
#include "plans/plan_impl.h"
#include "sequence.h"

namespace kvloom {

namespace {

constexpr char kMagic[9] = "KVLSNAP1";
constexpr char kEnd[9] = "KVLSEND1";
constexpr uint32_t kVersion = 3;       // float storage
constexpr uint32_t kVersionQuant = 5;  // quantized storage
constexpr uint32_t kVersionQuantOld = 4;  // quantized storage with the first 2-bit layout
constexpr uint32_t kNoPlan = 0xffffffffu;
constexpr int64_t kMaxSeqId = int64_t(1) << 24;

uint32_t dtype_code(dtype t) { return t == dtype::f32 ? 0 : t == dtype::f16 ? 1 : 2; }

class writer {
 public:
  template <class T>
  void put(T x) {
    const size_t at = buf.size();
    buf.resize(at + sizeof(T));
    std::memcpy(buf.data() + at, &x, sizeof(T));
  }
  template <class T>
  void put_array(const T* p, size_t n) {
    const size_t at = buf.size();
    buf.resize(at + sizeof(T) * n);
    if (n) std::memcpy(buf.data() + at, p, sizeof(T) * n);
  }
  void put_str(const std::string& s) {
    put<uint32_t>(static_cast<uint32_t>(s.size()));
    put_array(s.data(), s.size());
  }
  std::vector<uint8_t> buf;
};

[[noreturn]] void bad(const std::string& m) { fail_value("snapshot: " + m); }

class reader {
 public:
  reader(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  size_t left() const { return n_ - at_; }
  const uint8_t* take(size_t bytes, const char* what) {
    if (bytes > left())
      bad(std::string("truncated: ") + what + " needs " + std::to_string(bytes) + " bytes, " + std::to_string(left()) +
          " left");
    const uint8_t* q = p_ + at_;
    at_ += bytes;
    return q;
  }
  template <class T>
  T get(const char* what) {
    T x;
    std::memcpy(&x, take(sizeof(T), what), sizeof(T));
    return x;
  }
  // A count of items of at least `min_item_bytes` each: bounded by the bytes left, so a
  // corrupted count cannot make the importer allocate more than the blob could hold.
  uint64_t count(const char* what, size_t min_item_bytes, bool wide = false) {
    const uint64_t n = wide ? get<uint64_t>(what) : get<uint32_t>(what);
    if (min_item_bytes && n > left() / min_item_bytes)
      bad(std::string(what) + " " + std::to_string(n) + " does not fit in the " + std::to_string(left()) + " bytes left");
    return n;
  }
  template <class T>
  void get_array(T* out, size_t n, const char* what) {
    if (n) std::memcpy(out, take(sizeof(T) * n, what), sizeof(T) * n);
  }
  std::string get_str(const char* what) {
    const uint32_t len = get<uint32_t>(what);
    const uint8_t* q = take(len, what);
    return std::string(reinterpret_cast<const char*>(q), len);
  }

 private:
  const uint8_t* p_;
  size_t n_;
  size_t at_ = 0;
};

void put_plan(writer& w, const head_plan& plan) {
  const std::string& name = plan_origin_name(plan);
  if (name.empty()) fail_value("snapshot: plan '" + plan_describe(plan) + "' was not made by make_plan; it cannot be saved");
  const plan_params& p = plan_origin_params(plan);
  w.put_str(name);
  w.put<uint32_t>(static_cast<uint32_t>(p.numbers().size()));
  for (const auto& kv : p.numbers()) {
    w.put_str(kv.first);
    w.put<double>(kv.second);
  }
  w.put<uint32_t>(static_cast<uint32_t>(p.lists().size()));
  for (const auto& kv : p.lists()) {
    w.put_str(kv.first);
    w.put<uint32_t>(static_cast<uint32_t>(kv.second.size()));
    w.put_array(kv.second.data(), kv.second.size());
  }
  w.put<uint32_t>(static_cast<uint32_t>(p.texts().size()));
  for (const auto& kv : p.texts()) {
    w.put_str(kv.first);
    w.put_str(kv.second);
  }
}

std::shared_ptr<const head_plan> get_plan(reader& r, uint32_t index) {
  const std::string name = r.get_str("plan name");
  plan_params p;
  const uint64_t n_num = r.count("plan number count", 12);
  for (uint64_t i = 0; i < n_num; ++i) {
    std::string key = r.get_str("plan parameter name");
    p.set(key, r.get<double>("plan parameter"));
  }
  const uint64_t n_list = r.count("plan list count", 8);
  for (uint64_t i = 0; i < n_list; ++i) {
    std::string key = r.get_str("plan parameter name");
    std::vector<int32_t> v(static_cast<size_t>(r.count("plan list length", 4)));
    r.get_array(v.data(), v.size(), "plan list");
    p.set(key, std::move(v));
  }
  const uint64_t n_text = r.count("plan text count", 8);
  for (uint64_t i = 0; i < n_text; ++i) {
    std::string key = r.get_str("plan parameter name");
    p.set(key, r.get_str("plan text"));
  }
  try {
    return make_plan(name, p);
  } catch (const std::invalid_argument& e) {
    bad("plan " + std::to_string(index) + ": " + e.what());
  }
}

// One head as read from a blob, checked, not yet linked into the cache.
struct head_in {
  head_store hs;
  std::vector<int64_t> blocks;  // snapshot block index per table entry (-1: hole)
};

}  // namespace

std::vector<uint8_t> cache::export_sequences(const std::vector<int64_t>& seqs) const {
  use_scope scope(*this, seqs, false, "export_sequences");
  settle_scores(-1);
  for (size_t i = 0; i < seqs.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      if (seqs[i] == seqs[j]) fail_value("export_sequences: sequence " + std::to_string(seqs[i]) + " named twice");
  const int bs = pool_->block_size();
  const int64_t D = pool_->head_dim();
  const size_t row = static_cast<size_t>(D) * dtype_size(pool_->type());
  writer w;
  w.put_array(kMagic, 8);
  w.put<uint32_t>(qpool_ ? kVersionQuant : kVersion);
  for (uint32_t x : {dtype_code(pool_->type()), static_cast<uint32_t>(D), static_cast<uint32_t>(bs),
                     static_cast<uint32_t>(n_layers_), static_cast<uint32_t>(n_kv_heads_)})
    w.put<uint32_t>(x);
  if (qpool_) w.put<uint32_t>(static_cast<uint32_t>(qpool_->quant()->bits));
  for (int l = 0; l < n_layers_; ++l) w.put<int32_t>(layer_store_[l]);
  // distinct plans and blocks, in first-use order
  std::vector<const head_plan*> plans;
  std::unordered_map<const head_plan*, uint32_t> plan_ix;
  std::vector<block_id> blocks, sealed;
  std::unordered_map<block_id, int64_t> block_ix, sealed_ix;
  std::vector<std::vector<uint8_t>> row_live, sealed_live;  // per block: rows live in some head
  for (int64_t id : seqs) {
    const sequence& s = seq_ref(id);
    for (const head_store& hs : s.heads) {
      if (hs.plan_ && !plan_ix.count(hs.plan_.get())) {
        plan_ix[hs.plan_.get()] = static_cast<uint32_t>(plans.size());
        plans.push_back(hs.plan_.get());
      }
      for (size_t e = 0; e < hs.table_.size(); ++e) {
        const block_id b = hs.table_[e];
        if (b < 0) continue;
        const bool q = hs.sealed(e);
        auto& ix = q ? sealed_ix : block_ix;
        auto& list = q ? sealed : blocks;
        auto& lv = q ? sealed_live : row_live;
        auto it = ix.find(b);
        if (it == ix.end()) {
          it = ix.emplace(b, static_cast<int64_t>(list.size())).first;
          list.push_back(b);
          lv.emplace_back(static_cast<size_t>(bs), 0);
        }
        for (int r = 0; r < bs; ++r) lv[it->second][r] |= hs.live_[e * bs + r];
      }
    }
  }
  w.put<uint32_t>(static_cast<uint32_t>(plans.size()));
  for (const head_plan* p : plans) put_plan(w, *p);
  w.put<uint64_t>(static_cast<uint64_t>(blocks.size()));
  if (qpool_) w.put<uint64_t>(static_cast<uint64_t>(sealed.size()));
  w.put<uint32_t>(static_cast<uint32_t>(seqs.size()));
  for (int64_t id : seqs) {
    const sequence& s = seq_ref(id);
    w.put<int64_t>(id);
    for (int l = 0; l < n_layers_; ++l) {
      if (layer_store_[l] != l) continue;  // CLA readers hold nothing
      for (int h = 0; h < n_kv_heads_; ++h) {
        const head_store& hs = s.heads[hidx(l, h)];
        w.put<int64_t>(hs.n_appended_);
        w.put<uint32_t>(hs.plan_ ? plan_ix.at(hs.plan_.get()) : kNoPlan);
        w.put<uint32_t>(static_cast<uint32_t>(hs.table_.size()));
        for (size_t e = 0; e < hs.table_.size(); ++e) {
          const block_id b = hs.table_[e];
          w.put<int64_t>(b < 0 ? -1 : hs.sealed(e) ? -2 - sealed_ix.at(b) : block_ix.at(b));
        }
        // slot metadata of the held blocks only: a long-running Window's table is mostly holes
        auto put_held = [&](const auto& v) {
          for (size_t e = 0; e < hs.table_.size(); ++e)
            if (hs.table_[e] >= 0) w.put_array(v.data() + e * bs, static_cast<size_t>(bs));
        };
        put_held(hs.live_);
        put_held(hs.ord_);
        put_held(hs.pos_);
        put_held(hs.score_);
        put_held(hs.cls_);
      }
    }
  }
  // block bytes (from the device where they live), dead rows as zeros
  const detail::device_ops& ops = detail::ops_for(pool_->device());
  const size_t half = static_cast<size_t>(bs) * row;
  std::vector<uint8_t> tmp(2 * half);
  for (size_t i = 0; i < blocks.size(); ++i) {
    ops.to_host(pool_->device_id(), tmp.data(), pool_->block_keys(blocks[i]), half);
    ops.to_host(pool_->device_id(), tmp.data() + half, pool_->block_values(blocks[i]), half);
    for (int r = 0; r < bs; ++r)
      if (!row_live[i][r]) {
        std::memset(tmp.data() + r * row, 0, row);
        std::memset(tmp.data() + half + r * row, 0, row);
      }
    w.put_array(tmp.data(), tmp.size());
  }
  if (qpool_) {  // sealed blocks (from their device), dead rows' codes and value scales zeroed
    const quant_layout& L = *qpool_->quant();
    const size_t rb = L.code_row_bytes();
    std::vector<uint8_t> qb(L.bytes);
    for (size_t i = 0; i < sealed.size(); ++i) {
      ops.to_host(qpool_->device_id(), qb.data(), qpool_->block_keys(sealed[i]), L.bytes);
      auto* vmin = reinterpret_cast<uint16_t*>(qb.data() + L.value_params);
      auto* vstep = vmin + static_cast<size_t>(bs) * L.value_groups();
      for (int r = 0; r < bs; ++r)
        if (!sealed_live[i][r]) {
          std::memset(qb.data() + r * rb, 0, rb);
          std::memset(qb.data() + L.value_codes + r * rb, 0, rb);
          for (int g = 0; g < L.value_groups(); ++g) vmin[g * bs + r] = vstep[g * bs + r] = 0;
        }
      w.put_array(qb.data(), qb.size());
    }
  }
  w.put_array(kEnd, 8);
  return std::move(w.buf);
}

std::vector<int64_t> cache::import_sequences(const uint8_t* data, size_t size, bool keep_ids) {
  if (!data && size) fail_value("import_sequences: null data");
  std::unique_lock<std::shared_mutex> lock(seqs_mu_);  // structural: runs alone
  reader r(data, size);
  if (size < 8 || std::memcmp(r.take(8, "magic"), kMagic, 8) != 0) bad("not a kvloom sequence snapshot (bad magic)");
  const uint32_t version = r.get<uint32_t>("version");
  if (version < 1 || version > kVersionQuant)
    bad("format version " + std::to_string(version) + ", this kvloom reads versions 1 to " + std::to_string(kVersionQuant));
  const bool holes = version < kVersion;  // versions 1 and 2 carry slot metadata for the holes too
  const int bs = pool_->block_size();
  const int64_t D = pool_->head_dim();
  const uint32_t want[5] = {dtype_code(pool_->type()), static_cast<uint32_t>(D), static_cast<uint32_t>(bs),
                            static_cast<uint32_t>(n_layers_), static_cast<uint32_t>(n_kv_heads_)};
  const char* names[5] = {"dtype code", "head_dim", "block_size", "n_layers", "n_kv_heads"};
  for (int i = 0; i < 5; ++i) {
    const uint32_t got = r.get<uint32_t>(names[i]);
    if (got != want[i])
      bad(std::string("made for ") + names[i] + " " + std::to_string(got) + ", this cache has " + std::to_string(want[i]));
  }
  const bool quant = version == 2 || version == kVersionQuantOld || version == kVersionQuant;
  if (quant) {
    const uint32_t bits = r.get<uint32_t>("quantized bits");
    const uint32_t mine = qpool_ ? static_cast<uint32_t>(qpool_->quant()->bits) : 0;
    if (bits != mine)
      bad("made for int" + std::to_string(bits) + " storage, this cache has " +
          (mine ? "int" + std::to_string(mine) : std::string("no quantized storage")));
    if (bits == 2 && version != kVersionQuant)
      bad("format version " + std::to_string(version) +
          " holds 2-bit blocks in the first 2-bit layout (value groups of 32 channels, min-max ranges); "
          "this kvloom's 2-bit blocks differ and cannot read them");
  }
  for (int l = 0; l < n_layers_; ++l)
    if (r.get<int32_t>("layer sharing") != layer_store_[l])
      bad("made with other layer sharing (layer " + std::to_string(l) + ")");
  const uint64_t n_plans = r.count("plan count", 16);
  std::vector<std::shared_ptr<const head_plan>> plans;
  for (uint64_t i = 0; i < n_plans; ++i) plans.push_back(get_plan(r, static_cast<uint32_t>(i)));
  const size_t half = static_cast<size_t>(bs) * static_cast<size_t>(D) * dtype_size(pool_->type());
  const uint64_t n_blocks = r.count("block count", 2 * half, true);
  const size_t qbytes = quant ? qpool_->quant()->bytes : 0;
  const uint64_t n_sealed = quant ? r.count("sealed block count", qbytes, true) : 0;
  const uint64_t n_seqs = r.count("sequence count", 8);
  int n_owner = 0;
  for (int l = 0; l < n_layers_; ++l) n_owner += layer_store_[l] == l;
  std::vector<int64_t> ids(static_cast<size_t>(n_seqs));
  std::vector<std::vector<head_in>> heads(static_cast<size_t>(n_seqs));
  std::vector<int64_t> refs(static_cast<size_t>(n_blocks), 0), qrefs(static_cast<size_t>(n_sealed), 0);
  for (uint64_t si = 0; si < n_seqs; ++si) {
    ids[si] = r.get<int64_t>("sequence id");
    const std::string where = "sequence " + std::to_string(ids[si]);
    if (ids[si] < 0 || ids[si] >= kMaxSeqId) bad(where + ": id out of range");
    for (uint64_t sj = 0; sj < si; ++sj)
      if (ids[sj] == ids[si]) bad(where + " appears twice");
    heads[si].resize(static_cast<size_t>(n_owner) * n_kv_heads_);
    for (int oi = 0; oi < n_owner; ++oi) {
      int64_t layer_appended = -1;
      for (int h = 0; h < n_kv_heads_; ++h) {
        head_in& hi = heads[si][static_cast<size_t>(oi) * n_kv_heads_ + h];
        head_store& hs = hi.hs;
        const std::string at = where + " head " + std::to_string(oi) + "/" + std::to_string(h);
        hs.n_appended_ = r.get<int64_t>("appended count");
        if (hs.n_appended_ < 0 || hs.n_appended_ > std::numeric_limits<int32_t>::max()) bad(at + ": bad token count");
        if (layer_appended >= 0 && hs.n_appended_ != layer_appended) bad(at + ": heads of one layer disagree on length");
        layer_appended = hs.n_appended_;
        const uint32_t pi = r.get<uint32_t>("plan index");
        if (pi != kNoPlan && pi >= plans.size()) bad(at + ": plan index " + std::to_string(pi) + " out of range");
        if (pi != kNoPlan) hs.plan_ = plans[pi];
        const uint64_t n_table = r.count("block table size", 8 + (holes ? static_cast<size_t>(bs) * 14 : 0));
        hi.blocks.resize(static_cast<size_t>(n_table));
        r.get_array(hi.blocks.data(), hi.blocks.size(), "block table");
        const size_t n = static_cast<size_t>(n_table) * bs;
        hs.live_.assign(n, 0);
        hs.ord_.assign(n, 0);
        hs.pos_.assign(n, 0);
        hs.score_.assign(n, 0.0f);
        hs.cls_.assign(n, 0);
        // the slots with metadata in the blob: every slot (versions 1, 2) or the held blocks' ones
        std::vector<size_t> with;
        for (size_t e = 0; e < hi.blocks.size(); ++e)
          if (holes || hi.blocks[e] != -1) with.push_back(e);
        auto get_held = [&](auto& v, const char* what) {
          for (size_t e : with) r.get_array(v.data() + e * bs, static_cast<size_t>(bs), what);
        };
        get_held(hs.live_, "live flags");
        get_held(hs.ord_, "token indices");
        get_held(hs.pos_, "positions");
        get_held(hs.score_, "scores");
        get_held(hs.cls_, "classes");
        hs.table_.assign(static_cast<size_t>(n_table), -1);
        hs.block_live_.assign(static_cast<size_t>(n_table), 0);
        if (qpool_) hs.sealed_.assign(static_cast<size_t>(n_table), 0);
        std::vector<int32_t> live_ords;
        for (size_t e = 0; e < hi.blocks.size(); ++e) {
          const int64_t b = hi.blocks[e];
          const bool q = b <= -2;
          if (q && (-2 - b) >= static_cast<int64_t>(n_sealed))
            bad(at + ": sealed block index " + std::to_string(-2 - b) + " out of range");
          if (!q && (b < -1 || b >= static_cast<int64_t>(n_blocks)))
            bad(at + ": block index " + std::to_string(b) + " out of range");
          for (size_t e2 = 0; b != -1 && e2 < e; ++e2)
            if (hi.blocks[e2] == b) bad(at + ": block " + std::to_string(b) + " twice in one table");
          if (q) {
            ++qrefs[-2 - b];
            hs.sealed_[e] = 1;
          } else if (b >= 0) {
            ++refs[b];
          }
          for (int k = 0; k < bs; ++k) {
            const size_t sl = e * bs + k;
            if (hs.live_[sl] > 1) bad(at + ": live flag " + std::to_string(hs.live_[sl]));
            if (!hs.live_[sl]) continue;
            if (b == -1) bad(at + ": a live slot in a table hole");
            const int32_t o = hs.ord_[sl];
            if (o < 0 || o >= hs.n_appended_) bad(at + ": token index " + std::to_string(o) + " out of range");
            live_ords.push_back(o);
            if (!std::isfinite(hs.score_[sl]) || hs.score_[sl] < 0) bad(at + ": score not a finite non-negative number");
            ++hs.block_live_[e];
            ++hs.n_live_;
          }
        }
        std::sort(live_ords.begin(), live_ords.end());
        if (std::adjacent_find(live_ords.begin(), live_ords.end()) != live_ords.end()) bad(at + ": a token index repeats");
      }
    }
  }
  for (uint64_t b = 0; b < n_blocks; ++b)
    if (refs[b] == 0) bad("block " + std::to_string(b) + " is used by no head");
  for (uint64_t b = 0; b < n_sealed; ++b)
    if (qrefs[b] == 0) bad("sealed block " + std::to_string(b) + " is used by no head");
  if (r.left() != n_blocks * 2 * half + n_sealed * qbytes + 8)
    bad("block data: " + std::to_string(r.left()) + " bytes where " +
        std::to_string(n_blocks * 2 * half + n_sealed * qbytes + 8) + " were expected (truncated or corrupted)");
  const uint8_t* block_data = r.take(n_blocks * 2 * half, "block data");
  const uint8_t* sealed_data = r.take(n_sealed * qbytes, "sealed block data");
  if (std::memcmp(r.take(8, "end marker"), kEnd, 8) != 0) bad("bad end marker (truncated or corrupted)");
  if (keep_ids)
    for (int64_t id : ids)
      if (id < static_cast<int64_t>(seqs_.size()))
        bad("sequence id " + std::to_string(id) + " is taken in this cache (load into a fresh cache to keep ids)");

  // Everything checked: take the blocks (all or nothing), fill them, link the sequences.
  std::vector<block_id> got(static_cast<size_t>(n_blocks)), qgot(static_cast<size_t>(n_sealed));
  if (n_sealed) qpool_->alloc(static_cast<int64_t>(n_sealed), qgot.data());
  try {
    if (n_blocks) pool_->alloc(static_cast<int64_t>(n_blocks), got.data());
  } catch (...) {
    if (n_sealed) qpool_->decref_many(qgot.data(), qgot.size());
    throw;
  }
  try {
    const detail::device_ops& ops = detail::ops_for(pool_->device());
    for (uint64_t b = 0; b < n_sealed; ++b) ops.from_host(qpool_->device_id(), qpool_->block_keys(qgot[b]), sealed_data + b * qbytes, qbytes);
    for (uint64_t b = 0; b < n_blocks; ++b) {
      ops.from_host(pool_->device_id(), pool_->block_keys(got[b]), block_data + b * 2 * half, half);
      ops.from_host(pool_->device_id(), pool_->block_values(got[b]), block_data + b * 2 * half + half, half);
    }
  } catch (...) {  // (a failed device copy: every block still has the one reference alloc gave it)
    pool_->decref_many(got.data(), got.size());
    if (n_sealed) qpool_->decref_many(qgot.data(), qgot.size());
    throw;
  }
  for (uint64_t b = 0; b < n_sealed; ++b)  // the blocks' other references (cannot fail)
    for (int64_t k = 1; k < qrefs[b]; ++k) qpool_->incref(qgot[b]);
  for (uint64_t b = 0; b < n_blocks; ++b)
    for (int64_t k = 1; k < refs[b]; ++k) pool_->incref(got[b]);
  std::vector<int64_t> out;
  if (keep_ids) {
    int64_t top = static_cast<int64_t>(seqs_.size());
    for (int64_t id : ids) top = std::max(top, id + 1);
    seqs_.resize(static_cast<size_t>(top));
  }
  for (uint64_t si = 0; si < n_seqs; ++si) {
    auto s = std::make_unique<sequence>();
    s->heads.resize(static_cast<size_t>(n_layers_) * n_kv_heads_);
    int oi = 0;
    for (int l = 0; l < n_layers_; ++l) {
      if (layer_store_[l] != l) continue;
      for (int h = 0; h < n_kv_heads_; ++h) {
        head_in& hi = heads[si][static_cast<size_t>(oi) * n_kv_heads_ + h];
        for (size_t e = 0; e < hi.blocks.size(); ++e) {
          const int64_t b = hi.blocks[e];
          hi.hs.table_[e] = b == -1 ? -1 : b <= -2 ? qgot[-2 - b] : got[b];
        }
        if (!hi.hs.plan_) hi.hs.plan_ = plan_for(l);
        s->heads[hidx(l, h)] = std::move(hi.hs);
      }
      ++oi;
    }
    for (int l = 0; l < n_layers_; ++l)  // CLA readers: as seq_add leaves them
      if (layer_store_[l] != l)
        for (int h = 0; h < n_kv_heads_; ++h) s->heads[static_cast<size_t>(l) * n_kv_heads_ + h].plan_ = plan_for(l);
    const int64_t id = keep_ids ? ids[si] : static_cast<int64_t>(seqs_.size());
    if (keep_ids) {
      seqs_[id] = std::move(s);
    } else {
      seqs_.push_back(std::move(s));
    }
    out.push_back(id);
  }
  return out;
}

}  // namespace kvloom

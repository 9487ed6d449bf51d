// Suffix-decoding index core (CPython extension, built on first use by spec/suffix_build.py).
//
// Semantics (SuffixDecoding / Arctic Inference): a depth-limited suffix trie with counts, where the count of a
// string x (|x| <= depth) is its number of occurrences in the indexed sequences; a draft follows the child
// with the highest count, each token's probability being the running product of child/parent counts. Ties
// between children: a request's own tree prefers the continuation that occurred first (the prompt's text
// over the output's), a global tree the most recent one. In a request's own tree the matched string's count
// leaves out the query's own occurrence (the sequence's end), see eval_tree.
//
// Representation: a suffix automaton (SAM) per tree instead of a trie. A SAM state is a class of strings
// with the same end positions, so they share their occurrence count and their continuations; the counts of
// the states that hold strings of length <= depth are kept up to date on every insertion (and removal) by
// walking the suffix-link chain of the inserted position's length-<=depth suffix; each state keeps its best
// child. Consequences:
//   * insertion is amortized O(1) + O(#states on that chain) per token, no per-depth re-walk;
//   * the states of all suffixes of a request's own sequence (every match length at once) are the suffix-link
//     chain of one tracked state, so local matching costs nothing at speculate time;
//   * for a global tree, the longest match is kept per request and advanced by the new tokens (matching
//     statistics), and every shorter match is again on the suffix-link chain;
//   * all match lengths inside one state draft the same tokens with the same probabilities, so one walk per
//     state serves them all (only the budget min(max_tokens, factor*m, depth-m) differs).
// Global trees (one generalized SAM per tenant, responses only) drop their oldest response by decrementing
// its counts (states stay, with count 0, and are not matched or drafted); a tree is rebuilt from its live
// responses, a bounded amount per stop(), when the dropped tokens outnumber the live ones.
//
// Not thread-safe: one caller at a time (the Python wrapper holds the GIL throughout).

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

constexpr int kMaxDepth = 4096;
constexpr int64_t kUnseen = INT64_MIN;

// Where an insertion into a SAM stands: the state of the whole sequence so far (for the construction) and the
// state + length of its suffix of length min(depth, n) (for the counts).
struct Cursor {
    int32_t last = 0;
    int32_t dv = 0;
    int32_t dl = 0;
};

struct State {
    int32_t len;       // longest string of the state
    int32_t link;      // suffix link (-1 for the root)
    int32_t occ;       // occurrences (kept for states holding a string of length <= depth)
    int32_t best_tok;  // best child: highest count, then highest key; -1 if none
    int32_t best_tgt;
    int32_t deg;       // out-transitions
    int32_t tok0;      // the first transition, stored inline (most states have one)
    int32_t tgt0;
    int32_t head;      // the other transitions: a list in `edges_` (also in the hash)
    int32_t second;    // >= the count of every child but the best (lets removals skip most rescans)
    int64_t key;       // tie-break among children with equal counts, larger wins: the latest occurrence's time
                       // (recency trees) or minus the first occurrence's time (oldest-first trees)
};

struct Edge {
    int32_t tok;
    int32_t tgt;
    int32_t next;
};

// An append-only array in fixed blocks: growing never moves or copies elements (no stall on a big tree).
template <class T, int kShift = 15>
class Chunked {
public:
    T& operator[](size_t i) { return blocks_[i >> kShift][i & kMask]; }
    const T& operator[](size_t i) const { return blocks_[i >> kShift][i & kMask]; }
    size_t size() const { return n_; }
    void push_back(const T& v) {
        if ((n_ >> kShift) == blocks_.size()) blocks_.emplace_back(new T[kBlock]);
        (*this)[n_++] = v;
    }

private:
    static constexpr size_t kBlock = size_t(1) << kShift, kMask = kBlock - 1;
    std::vector<std::unique_ptr<T[]>> blocks_;
    size_t n_ = 0;
};

struct Slot {
    uint64_t key;  // (state << 32 | token) + 1; 0 = empty, so fresh tables come zeroed from calloc, untouched
    int32_t tgt;
    int32_t edge;
};

struct FreeDeleter {
    void operator()(Slot* p) const { std::free(p); }
};

// Open-addressing hash (linear probing, load <= 1/2) from (state, token) to a transition. It grows without a
// stall: a table twice the size is allocated (lazily zeroed pages) and the old one is migrated a few slots per
// insertion; until then lookups try both.
class EdgeHash {
public:
    explicit EdgeHash(size_t min_cap) { alloc(cur_, cur_cap_, cur_shift_, min_cap); }

    static uint64_t make_key(int32_t s, int32_t t) {
        return ((static_cast<uint64_t>(static_cast<uint32_t>(s)) << 32) | static_cast<uint32_t>(t)) + 1;
    }

    Slot* find(uint64_t key) {
        Slot* s = probe(cur_.get(), cur_cap_, cur_shift_, key);
        if (s->key == key) return s;
        if (old_) {
            Slot* o = probe(old_.get(), old_cap_, old_shift_, key);
            if (o->key == key) return o;
        }
        return nullptr;
    }
    const Slot* find(uint64_t key) const { return const_cast<EdgeHash*>(this)->find(key); }

    // `key` must be absent.
    void insert(uint64_t key, int32_t tgt, int32_t edge) {
        if (2 * (used_ + 1) > cur_cap_) {
            while (old_) migrate(old_cap_);  // a second growth before the first finished: finish it now
            old_ = std::move(cur_);
            old_cap_ = cur_cap_;
            old_shift_ = cur_shift_;
            old_pos_ = 0;
            alloc(cur_, cur_cap_, cur_shift_, 2 * old_cap_);
            used_ = 0;
        }
        put(key, tgt, edge);
        if (old_) migrate(8);
    }

private:
    static void alloc(std::unique_ptr<Slot[], FreeDeleter>& t, size_t& cap, int& shift, size_t min_cap) {
        cap = 64;
        while (cap < min_cap) cap <<= 1;
        t.reset(static_cast<Slot*>(std::calloc(cap, sizeof(Slot))));
        if (!t) throw std::bad_alloc();
        int bits = 0;
        while ((size_t(1) << bits) < cap) ++bits;
        shift = 64 - bits;
    }

    static Slot* probe(Slot* t, size_t cap, int shift, uint64_t key) {
        size_t i = (key * 0x9E3779B97F4A7C15ULL) >> shift;
        while (t[i].key != key && t[i].key != 0) i = (i + 1) & (cap - 1);
        return &t[i];
    }

    void put(uint64_t key, int32_t tgt, int32_t edge) {
        *probe(cur_.get(), cur_cap_, cur_shift_, key) = Slot{key, tgt, edge};
        ++used_;
    }

    void migrate(size_t n) {
        for (; n > 0 && old_pos_ < old_cap_; --n, ++old_pos_) {
            const Slot& s = old_[old_pos_];
            if (s.key != 0) put(s.key, s.tgt, s.edge);
        }
        if (old_pos_ == old_cap_) old_.reset();
    }

    std::unique_ptr<Slot[], FreeDeleter> cur_, old_;
    size_t cur_cap_ = 0, old_cap_ = 0, old_pos_ = 0, used_ = 0;
    int cur_shift_ = 58, old_shift_ = 58;
};

class Sam {
public:
    Sam(int depth, bool recency, size_t expect_tokens)
        : depth_(depth), recency_(recency), hash_(2 * expect_tokens) {
        new_state(0, -1);
    }

    int depth() const { return depth_; }
    size_t num_states() const { return st_.size(); }

    int32_t minlen(int32_t v) const { return v == 0 ? 0 : st_[st_[v].link].len + 1; }

    // Target of the transition (s, t), or -1.
    int32_t next(int32_t s, int32_t t) const {
        const State& x = st_[s];
        if (x.deg == 0) return -1;
        if (x.tok0 == t) return x.tgt0;
        if (x.deg == 1) return -1;
        const Slot* slot = hash_.find(EdgeHash::make_key(s, t));
        return slot ? slot->tgt : -1;
    }

    // Append one token at time `ts` to the sequence the cursor stands on.
    void push(Cursor& c, int32_t tok, int64_t ts) {
        c.last = extend(c.last, tok);
        // The old depth state may have been split by a clone: its string of length dl moves to the clone.
        int32_t ov = c.dv;
        const int32_t ol = c.dl;
        while (ov != 0 && ol < minlen(ov)) ov = st_[ov].link;
        int32_t sv = ov, sl = ol;
        if (sl >= depth_) {
            sl = depth_ - 1;
            while (sv != 0 && sl < minlen(sv)) sv = st_[sv].link;
        }
        // The state of the new suffix of length sl + 1: on the suffix-link chain of the new last state,
        // usually within a few steps; else one lookup.
        int32_t w = c.last;
        for (int steps = 0; w != 0 && sl + 1 < minlen(w); ++steps) {
            if (steps == 8) {
                w = next(sv, tok);
                break;
            }
            w = st_[w].link;
        }
        for (int32_t u = w; u != 0; u = st_[u].link) {
            st_[u].occ += 1;
            if (recency_) {
                st_[u].key = std::max(st_[u].key, ts);  // responses may be re-inserted out of order (rebuilds)
            } else if (st_[u].key == kUnseen) {
                st_[u].key = -ts;
            }
        }
        // Every state holding a suffix x (|x| < depth) of the old sequence gained one occurrence of x+tok
        // (no other child of it changed): x+tok may now be its best child.
        int32_t u = w;
        for (int32_t p = ov; p > 0; p = st_[p].link) {
            State& ps = st_[p];
            const int32_t hi = std::min(std::min(ps.len, ol), depth_ - 1);
            if (hi < minlen(p)) continue;
            while (hi + 1 < minlen(u)) u = st_[u].link;
            const int32_t b = ps.best_tgt;
            if (b == u) continue;
            if (b < 0 || st_[u].occ > st_[b].occ || (st_[u].occ == st_[b].occ && st_[u].key > st_[b].key)) {
                if (b >= 0) ps.second = std::max(ps.second, st_[b].occ);
                ps.best_tok = tok;
                ps.best_tgt = u;
            } else {
                ps.second = std::max(ps.second, st_[u].occ);
            }
        }
        c.dv = w;
        c.dl = sl + 1;
    }

    // Take away the counts of one sequence that was pushed earlier, and it is the oldest one still counted, in
    // a recency tree (so the latest occurrence of every string that keeps a count is unchanged).
    void remove(const int32_t* toks, size_t n) {
        std::vector<int32_t> touched;  // states whose best child lost an occurrence
        int32_t v = 0, l = 0;
        for (size_t j = 0; j < n; ++j) {
            const int32_t tok = toks[j];
            const int32_t ov = v, ol = l;
            int32_t sv = v, sl = l;
            if (sl >= depth_) {
                sl = depth_ - 1;
                while (sv != 0 && sl < minlen(sv)) sv = st_[sv].link;
            }
            const int32_t w = next(sv, tok);
            for (int32_t u = w; u != 0; u = st_[u].link) st_[u].occ -= 1;
            int32_t u = w;
            for (int32_t p = ov; p > 0; p = st_[p].link) {
                const int32_t hi = std::min(std::min(st_[p].len, ol), depth_ - 1);
                if (hi < minlen(p)) continue;
                while (hi + 1 < minlen(u)) u = st_[u].link;
                if (st_[p].best_tgt == u) touched.push_back(p);
            }
            v = w;
            l = sl + 1;
        }
        std::sort(touched.begin(), touched.end());
        touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
        for (int32_t p : touched) {
            const int32_t b = st_[p].best_tgt;
            if (st_[b].occ <= st_[p].second) recompute_best(p);  // else it still beats every other child
        }
    }

    // Matching statistics over live states: (v, l) = the longest suffix (<= depth) of the text read so far
    // that occurs in the tree; read one more token.
    void match_step(int32_t& v, int32_t& l, int32_t tok) const {
        if (l >= depth_) {
            l = depth_ - 1;
            while (v != 0 && l < minlen(v)) v = st_[v].link;
        }
        while (true) {
            const int32_t w = next(v, tok);
            if (w >= 0 && st_[w].occ > 0) {
                v = w;
                l += 1;
                return;
            }
            if (v == 0) {
                l = 0;
                return;
            }
            v = st_[v].link;
            l = st_[v].len;
        }
    }

    Chunked<State> st_;

private:
    int32_t new_state(int32_t len, int32_t link) {
        st_.push_back(State{len, link, 0, -1, -1, 0, -1, -1, -1, 0, kUnseen});
        return static_cast<int32_t>(st_.size() - 1);
    }

    void add_edge(int32_t s, int32_t t, int32_t tgt) {
        State& x = st_[s];
        if (x.deg++ == 0) {
            x.tok0 = t;
            x.tgt0 = tgt;
            return;
        }
        const int32_t e = static_cast<int32_t>(edges_.size());
        edges_.push_back(Edge{t, tgt, x.head});
        x.head = e;
        hash_.insert(EdgeHash::make_key(s, t), tgt, e);
    }

    void set_target(int32_t s, int32_t t, int32_t tgt) {
        State& x = st_[s];
        if (x.tok0 == t) {
            x.tgt0 = tgt;
            return;
        }
        Slot* slot = hash_.find(EdgeHash::make_key(s, t));
        slot->tgt = tgt;
        edges_[slot->edge].tgt = tgt;
    }

    int32_t clone(int32_t q, int32_t len) {
        const int32_t c = new_state(len, st_[q].link);
        State& cs = st_[c];
        const State& qs = st_[q];
        cs.occ = qs.occ;
        cs.key = qs.key;
        cs.best_tok = qs.best_tok;
        cs.best_tgt = qs.best_tgt;
        cs.second = qs.second;
        if (qs.deg > 0) add_edge(c, qs.tok0, qs.tgt0);
        for (int32_t e = st_[q].head; e >= 0; e = edges_[e].next) add_edge(c, edges_[e].tok, edges_[e].tgt);
        return c;
    }

    void redirect(int32_t p, int32_t tok, int32_t q, int32_t c) {
        while (p >= 0 && next(p, tok) == q) {
            set_target(p, tok, c);
            if (st_[p].best_tgt == q) st_[p].best_tgt = c;
            p = st_[p].link;
        }
    }

    // Generalized suffix automaton extension (several sequences, each started from the root).
    int32_t extend(int32_t last, int32_t tok) {
        int32_t q = next(last, tok);
        if (q >= 0) {
            if (st_[q].len == st_[last].len + 1) return q;
            const int32_t c = clone(q, st_[last].len + 1);
            redirect(last, tok, q, c);
            st_[q].link = c;
            return c;
        }
        const int32_t cur = new_state(st_[last].len + 1, 0);
        add_edge(last, tok, cur);
        int32_t p = st_[last].link;
        while (p >= 0) {
            q = next(p, tok);
            if (q >= 0) break;
            add_edge(p, tok, cur);
            p = st_[p].link;
        }
        if (p < 0) return cur;
        if (st_[p].len + 1 == st_[q].len) {
            st_[cur].link = q;
            return cur;
        }
        const int32_t c = clone(q, st_[p].len + 1);
        redirect(p, tok, q, c);
        st_[q].link = c;
        st_[cur].link = c;
        return cur;
    }

    void recompute_best(int32_t p) {
        int32_t bt = -1, bs = -1, bo = 0, second = 0;
        int64_t bk = kUnseen;
        auto consider = [&](int32_t tok, int32_t u) {
            const int32_t o = st_[u].occ;
            if (o > 0 && (o > bo || (o == bo && st_[u].key > bk))) {
                second = std::max(second, bo);
                bo = o;
                bk = st_[u].key;
                bt = tok;
                bs = u;
            } else {
                second = std::max(second, o);
            }
        };
        if (st_[p].deg > 0) consider(st_[p].tok0, st_[p].tgt0);
        for (int32_t e = st_[p].head; e >= 0; e = edges_[e].next) consider(edges_[e].tok, edges_[e].tgt);
        st_[p].best_tok = bt;
        st_[p].best_tgt = bs;
        st_[p].second = second;
    }

    int depth_;
    bool recency_;
    Chunked<Edge> edges_;
    EdgeHash hash_;
};

// ---------------------------------------------------------------------------------------------------------
// Drafting.

struct Best {
    double score = 0.0;
    int32_t match_len = 0;
    int32_t ntok = 0;
    const Sam* sam = nullptr;
    int32_t state = -1;
    int32_t self = 0;  // occurrences of the matched string that are the query itself (left out of its count)
};

struct SpecParams {
    int max_tokens;
    double factor;
    double min_prob;
};

inline int budget(int m, const SpecParams& sp) {
    const double b = m * sp.factor + 1e-6;  // Arctic's floor(factor * m + offset), offset 0
    return b >= sp.max_tokens ? sp.max_tokens : static_cast<int>(b);
}

// Candidates of one tree: every match length m of the chain starting at (v, l); a candidate replaces `best`
// only with a strictly higher score (callers go from longer to shorter matches and local before global, so
// ties keep the longer match and the local tree). `self` = 1 for a request's own tree, which holds the
// query's own occurrence (the sequence's end, with no continuation): it is left out of the matched string's
// count, so the first token's probability is its frequency among the earlier occurrences.
void eval_tree(const Sam& sam, int32_t v, int32_t l, int32_t self, const SpecParams& sp, Best& best,
               std::vector<double>& sc) {
    const int depth = sam.depth();
    int32_t u = v;
    int32_t hi = std::min<int32_t>(l, depth);
    while (u > 0 && hi >= 1) {
        if (budget(hi, sp) <= best.score) break;  // no shorter match can draft more than its budget
        const int32_t lo = sam.minlen(u);
        int kmax = 0;
        for (int32_t m = lo; m <= hi; ++m) kmax = std::max(kmax, std::min(budget(m, sp), depth - m));
        if (kmax > best.score) {
            sc[0] = 0.0;
            double prob = 1.0;
            int n = 0;
            int32_t cur = u;
            while (n < kmax) {
                const int32_t b = sam.st_[cur].best_tgt;
                const int32_t denom = sam.st_[cur].occ - (n == 0 ? self : 0);
                if (b < 0 || sam.st_[b].occ <= 0 || denom <= 0) break;
                prob *= static_cast<double>(sam.st_[b].occ) / static_cast<double>(denom);
                if (prob < sp.min_prob) break;
                sc[n + 1] = sc[n] + prob;
                ++n;
                cur = b;
            }
            for (int32_t m = hi; m >= lo; --m) {
                const int k = std::min(std::min(budget(m, sp), depth - m), n);
                if (sc[k] > best.score) {
                    best.score = sc[k];
                    best.match_len = m;
                    best.ntok = k;
                    best.sam = &sam;
                    best.state = u;
                    best.self = self;
                }
            }
        }
        u = sam.st_[u].link;
        hi = sam.st_[u].len;
    }
}

// ---------------------------------------------------------------------------------------------------------
// The index: requests (local trees) and tenants (global trees).

struct Response {
    std::vector<int32_t> toks;
    int64_t ts0;
};

// A tenant's global tree. When it has dropped more tokens than it holds, a fresh tree (`shadow`) is built from
// the live responses a bounded amount per stop() (no stall), then replaces it. While it builds, responses
// [copy_next, copy_end) of `resps` are still to be copied; the others are in both trees.
struct Tenant {
    std::unique_ptr<Sam> sam;
    std::unique_ptr<Sam> shadow;
    std::deque<Response> resps;
    size_t copy_next = 0, copy_end = 0;
    int64_t live = 0;
    int64_t dropped = 0;         // tokens removed from `sam` since it was built
    int64_t shadow_dropped = 0;  // tokens removed from `shadow`
    uint64_t version = 0;
};

struct Seq {
    Sam local;
    Cursor cur;
    std::vector<int32_t> toks;
    size_t prompt_len = 0;
    int tenant = 0;
    uint64_t gver = ~0ULL;
    size_t gpos = 0;
    int32_t gv = 0, gl = 0;

    Seq(int depth, size_t n) : local(depth, /*recency=*/false, n) {}
};

class Index {
public:
    Index(int depth, int64_t max_global, int64_t compact_min, int64_t compact_rate, int64_t compact_step)
        : depth_(depth), max_global_(max_global), compact_min_(compact_min), compact_rate_(compact_rate),
          compact_step_(compact_step) {}

    int depth() const { return depth_; }

    Seq* find(int64_t id) {
        auto it = seqs_.find(id);
        return it == seqs_.end() ? nullptr : it->second.get();
    }

    bool start(int64_t id, const std::vector<int32_t>& prompt, int tenant) {
        if (seqs_.count(id)) return false;
        auto s = std::make_unique<Seq>(depth_, prompt.size() + 256);
        s->tenant = tenant;
        s->prompt_len = prompt.size();
        s->toks.reserve(prompt.size() + 256);
        append(*s, prompt.data(), prompt.size());
        seqs_.emplace(id, std::move(s));
        if (static_cast<size_t>(tenant) >= tenants_.size()) tenants_.resize(tenant + 1);
        return true;
    }

    void append(Seq& s, const int32_t* t, size_t n) {
        for (size_t i = 0; i < n; ++i) {
            s.local.push(s.cur, t[i], static_cast<int64_t>(s.toks.size()));
            s.toks.push_back(t[i]);
        }
    }

    void stop(int64_t id, bool keep) {
        auto it = seqs_.find(id);
        std::unique_ptr<Seq> s = std::move(it->second);
        seqs_.erase(it);
        const size_t n = s->toks.size() - s->prompt_len;
        if (!keep || max_global_ <= 0 || n == 0 || static_cast<int64_t>(n) > max_global_) return;
        int64_t work = static_cast<int64_t>(n);
        while (total_live_ + static_cast<int64_t>(n) > max_global_ && !fifo_.empty()) work += evict_oldest();
        Tenant& t = tenants_[s->tenant];
        Response r{std::vector<int32_t>(s->toks.begin() + s->prompt_len, s->toks.end()), clock_};
        clock_ += static_cast<int64_t>(n);
        if (!t.sam) t.sam = std::make_unique<Sam>(depth_, /*recency=*/true, n);
        insert_response(*t.sam, r);
        if (t.shadow) insert_response(*t.shadow, r);
        t.live += static_cast<int64_t>(n);
        total_live_ += static_cast<int64_t>(n);
        t.version += 1;
        t.resps.push_back(std::move(r));
        fifo_.push_back(s->tenant);
        if (t.shadow) rebuild_step(t, compact_rate_ * work + compact_step_);
    }

    int64_t global_tokens(int tenant) const {
        if (tenant < 0) return total_live_;
        if (static_cast<size_t>(tenant) >= tenants_.size()) return 0;
        return tenants_[tenant].live;
    }

    // Best draft for one request (its tokens come from draft_tokens).
    Best speculate(Seq& s, const SpecParams& sp, std::vector<double>& sc) {
        Best best;
        if (sp.max_tokens <= 0 || s.toks.empty()) return best;
        int32_t v = s.cur.dv, l = s.cur.dl;
        eval_tree(s.local, v, l, 1, sp, best, sc);
        if (static_cast<size_t>(s.tenant) < tenants_.size()) {
            Tenant& t = tenants_[s.tenant];
            if (t.sam && t.live > 0 && budget(depth_, sp) > best.score) {
                update_global_match(s, t);
                if (s.gl > 0) eval_tree(*t.sam, s.gv, s.gl, 0, sp, best, sc);
            }
        }
        return best;
    }

    static void draft_tokens(const Best& b, int32_t* toks, double* probs) {
        const Sam& sam = *b.sam;
        double prob = 1.0;
        int32_t cur = b.state;
        for (int k = 0; k < b.ntok; ++k) {
            const int32_t nb = sam.st_[cur].best_tgt;
            const int32_t denom = sam.st_[cur].occ - (k == 0 ? b.self : 0);
            prob *= static_cast<double>(sam.st_[nb].occ) / static_cast<double>(denom);
            toks[k] = sam.st_[cur].best_tok;
            probs[k] = prob;
            cur = nb;
        }
    }

    size_t num_states(int64_t id) {
        Seq* s = find(id);
        return s ? s->local.num_states() : 0;
    }

private:
    void insert_response(Sam& sam, const Response& r) {
        Cursor c;
        for (size_t i = 0; i < r.toks.size(); ++i) sam.push(c, r.toks[i], r.ts0 + static_cast<int64_t>(i));
    }

    // Drops the oldest kept response (of any tenant); returns its length.
    int64_t evict_oldest() {
        const int ti = fifo_.front();
        fifo_.pop_front();
        Tenant& t = tenants_[ti];
        Response r = std::move(t.resps.front());
        t.resps.pop_front();
        const int64_t n = static_cast<int64_t>(r.toks.size());
        t.live -= n;
        total_live_ -= n;
        t.version += 1;
        if (t.live == 0) {
            t.sam.reset();
            t.shadow.reset();
            t.copy_next = t.copy_end = 0;
            t.dropped = 0;
            return n;
        }
        t.sam->remove(r.toks.data(), r.toks.size());
        t.dropped += n;
        if (t.shadow) {
            if (t.copy_next > 0 || t.copy_end == 0) {  // it is in the shadow too
                t.shadow->remove(r.toks.data(), r.toks.size());
                t.shadow_dropped += n;
            }
            t.copy_next -= t.copy_next > 0;
            t.copy_end -= t.copy_end > 0;
        } else if (t.dropped > t.live && t.dropped >= compact_min_) {
            t.shadow = std::make_unique<Sam>(depth_, /*recency=*/true, static_cast<size_t>(t.live));
            t.copy_next = 0;
            t.copy_end = t.resps.size();
            t.shadow_dropped = 0;
        }
        if (t.shadow) rebuild_step(t, compact_rate_ * n + compact_step_);
        return n;
    }

    // Copy about `budget` tokens of live responses into the shadow tree; swap it in when complete.
    void rebuild_step(Tenant& t, int64_t budget) {
        while (budget > 0 && t.copy_next < t.copy_end) {
            const Response& r = t.resps[t.copy_next++];
            insert_response(*t.shadow, r);
            budget -= static_cast<int64_t>(r.toks.size());
        }
        if (t.copy_next == t.copy_end) {
            t.sam = std::move(t.shadow);
            t.dropped = t.shadow_dropped;
            t.copy_next = t.copy_end = 0;
            t.version += 1;
        }
    }

    void update_global_match(Seq& s, Tenant& t) {
        const size_t n = s.toks.size();
        if (s.gver != t.version || n - s.gpos > static_cast<size_t>(depth_)) {
            s.gpos = n > static_cast<size_t>(depth_) ? n - depth_ : 0;
            s.gv = 0;
            s.gl = 0;
            s.gver = t.version;
        }
        for (size_t j = s.gpos; j < n; ++j) t.sam->match_step(s.gv, s.gl, s.toks[j]);
        s.gpos = n;
    }

    int depth_;
    int64_t max_global_;
    int64_t compact_min_;   // rebuild a global tree once it has dropped this many tokens and more than it holds
    int64_t compact_rate_;  // a tree being rebuilt gets compact_rate * (tokens added or dropped) + compact_step
    int64_t compact_step_;  // tokens copied per stop() (whole responses, at least one)
    int64_t total_live_ = 0;
    int64_t clock_ = 0;
    std::unordered_map<int64_t, std::unique_ptr<Seq>> seqs_;
    std::vector<Tenant> tenants_;
    std::deque<int> fifo_;
};

// ---------------------------------------------------------------------------------------------------------
// Python bindings.

struct CoreObject {
    PyObject_HEAD
    Index* index;
    std::vector<double>* scratch;
    std::vector<int32_t>* tokbuf;
    std::vector<double>* probbuf;
};

// The Python draft class (a slots dataclass: tokens, score, match_len, probs), filled in directly through its
// slot offsets: its generated __init__ costs ~1.5 us per object, a third of a batch-64 step. Unset (or of an
// unexpected layout): drafts are returned as tuples.
PyTypeObject* g_draft_type = nullptr;
Py_ssize_t g_draft_off[4];

bool parse_tokens(PyObject* obj, std::vector<int32_t>& out) {
    out.clear();
    if (PyObject_CheckBuffer(obj) && !PyBytes_Check(obj) && !PyByteArray_Check(obj)) {
        Py_buffer view;
        if (PyObject_GetBuffer(obj, &view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) == 0) {
            const char* f = view.format ? view.format : "B";
            if (*f == '<' || *f == '=' || *f == '@') ++f;
            const bool ok_fmt = (f[1] == '\0') && (*f == 'i' || *f == 'l' || *f == 'q') &&
                                (view.itemsize == 4 || view.itemsize == 8) && view.ndim <= 1;
            if (ok_fmt) {
                const Py_ssize_t n = view.len / view.itemsize;
                out.resize(n);
                bool bad = false;
                for (Py_ssize_t i = 0; i < n; ++i) {
                    int64_t x = view.itemsize == 4 ? static_cast<const int32_t*>(view.buf)[i]
                                                   : static_cast<const int64_t*>(view.buf)[i];
                    if (x < 0 || x > INT32_MAX) { bad = true; break; }
                    out[i] = static_cast<int32_t>(x);
                }
                PyBuffer_Release(&view);
                if (bad) {
                    PyErr_SetString(PyExc_ValueError, "token ids must be in [0, 2**31)");
                    return false;
                }
                return true;
            }
            PyBuffer_Release(&view);
        } else {
            PyErr_Clear();
        }
    }
    PyObject* seq = PySequence_Fast(obj, "tokens must be a sequence of ints");
    if (!seq) return false;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject** items = PySequence_Fast_ITEMS(seq);
    out.resize(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
        const long long x = PyLong_AsLongLong(items[i]);
        if (x == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return false;
        }
        if (x < 0 || x > INT32_MAX) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "token ids must be in [0, 2**31)");
            return false;
        }
        out[i] = static_cast<int32_t>(x);
    }
    Py_DECREF(seq);
    return true;
}

bool parse_seq_id(PyObject* obj, int64_t& id) {
    id = PyLong_AsLongLong(obj);
    return !(id == -1 && PyErr_Occurred());
}

Seq* lookup(CoreObject* self, PyObject* obj) {
    int64_t id;
    if (!parse_seq_id(obj, id)) return nullptr;
    Seq* s = self->index->find(id);
    if (!s) PyErr_Format(PyExc_ValueError, "unknown seq_id %lld (not started, or already stopped)", (long long)id);
    return s;
}

void core_dealloc(CoreObject* self) {
    delete self->index;
    delete self->scratch;
    delete self->tokbuf;
    delete self->probbuf;
    Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

int core_init(CoreObject* self, PyObject* args, PyObject*) {
    int depth;
    long long max_global;
    long long compact_min = 1 << 16, compact_rate = 2, compact_step = 4096;
    if (!PyArg_ParseTuple(args, "iL|LLL", &depth, &max_global, &compact_min, &compact_rate, &compact_step)) return -1;
    if (compact_min < 1 || compact_rate < 0 || compact_step < 1) {
        PyErr_SetString(PyExc_ValueError, "compact_min and compact_step must be >= 1, compact_rate >= 0");
        return -1;
    }
    if (depth < 1 || depth > kMaxDepth) {
        PyErr_Format(PyExc_ValueError, "max_depth must be in [1, %d], got %d", kMaxDepth, depth);
        return -1;
    }
    if (max_global < 0) {
        PyErr_SetString(PyExc_ValueError, "max_global_tokens must be >= 0");
        return -1;
    }
    try {
        delete self->index;
        self->index = new Index(depth, max_global, compact_min, compact_rate, compact_step);
        if (!self->scratch) self->scratch = new std::vector<double>();
        if (!self->tokbuf) self->tokbuf = new std::vector<int32_t>();
        if (!self->probbuf) self->probbuf = new std::vector<double>();
        self->scratch->assign(depth + 2, 0.0);
    } catch (const std::bad_alloc&) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

#define CORE_TRY try {
#define CORE_CATCH \
    } catch (const std::bad_alloc&) { return PyErr_NoMemory(); } \
    catch (const std::exception& e) { PyErr_SetString(PyExc_RuntimeError, e.what()); return nullptr; }

PyObject* core_start(CoreObject* self, PyObject* args) {
    PyObject *id_obj, *tok_obj;
    int tenant;
    if (!PyArg_ParseTuple(args, "OOi", &id_obj, &tok_obj, &tenant)) return nullptr;
    int64_t id;
    if (!parse_seq_id(id_obj, id)) return nullptr;
    if (tenant < 0) {
        PyErr_SetString(PyExc_ValueError, "tenant id must be >= 0");
        return nullptr;
    }
    CORE_TRY
    std::vector<int32_t>& buf = *self->tokbuf;
    if (!parse_tokens(tok_obj, buf)) return nullptr;
    if (!self->index->start(id, buf, tenant)) {
        PyErr_Format(PyExc_ValueError, "seq_id %lld is already active", (long long)id);
        return nullptr;
    }
    Py_RETURN_NONE;
    CORE_CATCH
}

PyObject* core_extend(CoreObject* self, PyObject* const* args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "extend(seq_id, tokens)");
        return nullptr;
    }
    Seq* s = lookup(self, args[0]);
    if (!s) return nullptr;
    CORE_TRY
    std::vector<int32_t>& buf = *self->tokbuf;
    if (!parse_tokens(args[1], buf)) return nullptr;
    self->index->append(*s, buf.data(), buf.size());
    Py_RETURN_NONE;
    CORE_CATCH
}

PyObject* core_extend_batch(CoreObject* self, PyObject* const* args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "extend_batch(seq_ids, token_lists)");
        return nullptr;
    }
    PyObject* ids = PySequence_Fast(args[0], "seq_ids must be a sequence");
    if (!ids) return nullptr;
    PyObject* lists = PySequence_Fast(args[1], "token_lists must be a sequence");
    if (!lists) {
        Py_DECREF(ids);
        return nullptr;
    }
    PyObject* ret = nullptr;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(ids);
    if (PySequence_Fast_GET_SIZE(lists) != n) {
        PyErr_SetString(PyExc_ValueError, "seq_ids and token_lists differ in length");
    } else {
        try {
            // Check everything first so that a bad entry changes nothing.
            std::vector<Seq*> seqs(n);
            std::vector<std::vector<int32_t>> toks(n);
            bool ok = true;
            for (Py_ssize_t i = 0; i < n && ok; ++i) {
                seqs[i] = lookup(self, PySequence_Fast_GET_ITEM(ids, i));
                ok = seqs[i] && parse_tokens(PySequence_Fast_GET_ITEM(lists, i), toks[i]);
            }
            if (ok) {
                for (Py_ssize_t i = 0; i < n; ++i) self->index->append(*seqs[i], toks[i].data(), toks[i].size());
                ret = Py_None;
                Py_INCREF(ret);
            }
        } catch (const std::bad_alloc&) {
            PyErr_NoMemory();
        }
    }
    Py_DECREF(ids);
    Py_DECREF(lists);
    return ret;
}

PyObject* core_stop(CoreObject* self, PyObject* args) {
    PyObject* id_obj;
    int keep;
    if (!PyArg_ParseTuple(args, "Op", &id_obj, &keep)) return nullptr;
    int64_t id;
    if (!parse_seq_id(id_obj, id)) return nullptr;
    if (!self->index->find(id)) {
        PyErr_Format(PyExc_ValueError, "unknown seq_id %lld (not started, or already stopped)", (long long)id);
        return nullptr;
    }
    CORE_TRY
    self->index->stop(id, keep != 0);
    Py_RETURN_NONE;
    CORE_CATCH
}

PyObject* make_draft(CoreObject* self, const Best& b) {
    std::vector<int32_t>& tb = *self->tokbuf;
    std::vector<double>& pb = *self->probbuf;
    tb.resize(b.ntok);
    pb.resize(b.ntok);
    if (b.ntok > 0) Index::draft_tokens(b, tb.data(), pb.data());
    PyObject* toks = PyList_New(b.ntok);
    PyObject* probs = PyList_New(b.ntok);
    if (!toks || !probs) {
        Py_XDECREF(toks);
        Py_XDECREF(probs);
        return nullptr;
    }
    for (int k = 0; k < b.ntok; ++k) {
        PyList_SET_ITEM(toks, k, PyLong_FromLong(tb[k]));
        PyList_SET_ITEM(probs, k, PyFloat_FromDouble(pb[k]));
    }
    PyObject* score = PyFloat_FromDouble(b.ntok > 0 ? b.score : 0.0);
    PyObject* mlen = PyLong_FromLong(b.ntok > 0 ? b.match_len : 0);
    if (!score || !mlen) {
        Py_DECREF(toks);
        Py_DECREF(probs);
        Py_XDECREF(score);
        Py_XDECREF(mlen);
        return nullptr;
    }
    if (!g_draft_type) return Py_BuildValue("(NNNN)", toks, score, mlen, probs);
    PyObject* obj = g_draft_type->tp_alloc(g_draft_type, 0);
    PyObject* fields[4] = {toks, score, mlen, probs};
    if (!obj) {
        for (PyObject* f : fields) Py_DECREF(f);
        return nullptr;
    }
    for (int i = 0; i < 4; ++i) *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(obj) + g_draft_off[i]) = fields[i];
    return obj;
}

// set_draft_type(cls): cls must be a type whose attributes tokens, score, match_len, probs are object slots.
PyObject* set_draft_type(PyObject*, PyObject* cls) {
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "set_draft_type expects a class");
        return nullptr;
    }
    static const char* names[4] = {"tokens", "score", "match_len", "probs"};
    Py_ssize_t off[4];
    for (int i = 0; i < 4; ++i) {
        PyObject* d = PyObject_GetAttrString(cls, names[i]);
        if (!d) return nullptr;
        const bool ok = Py_IS_TYPE(d, &PyMemberDescr_Type) &&
                        reinterpret_cast<PyMemberDescrObject*>(d)->d_member->type == T_OBJECT_EX;
        if (ok) off[i] = reinterpret_cast<PyMemberDescrObject*>(d)->d_member->offset;
        Py_DECREF(d);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "%R.%s is not an object slot", cls, names[i]);
            return nullptr;
        }
    }
    Py_INCREF(cls);
    Py_XDECREF(reinterpret_cast<PyObject*>(g_draft_type));
    g_draft_type = reinterpret_cast<PyTypeObject*>(cls);
    std::memcpy(g_draft_off, off, sizeof(off));
    Py_RETURN_NONE;
}

bool parse_spec(PyObject* f_obj, PyObject* p_obj, SpecParams& sp) {
    sp.factor = PyFloat_AsDouble(f_obj);
    if (sp.factor == -1.0 && PyErr_Occurred()) return false;
    sp.min_prob = PyFloat_AsDouble(p_obj);
    if (sp.min_prob == -1.0 && PyErr_Occurred()) return false;
    return true;
}

// speculate_batch(seq_ids, max_tokens, factor, min_prob) -> list of (tokens, probs, score, match_len)
PyObject* core_speculate_batch(CoreObject* self, PyObject* const* args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "speculate_batch(seq_ids, max_tokens, factor, min_prob)");
        return nullptr;
    }
    SpecParams base;
    if (!parse_spec(args[2], args[3], base)) return nullptr;
    PyObject* ids = PySequence_Fast(args[0], "seq_ids must be a sequence");
    if (!ids) return nullptr;
    PyObject* mts = PySequence_Fast(args[1], "max_tokens must be a sequence");
    if (!mts) {
        Py_DECREF(ids);
        return nullptr;
    }
    PyObject* out = nullptr;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(ids);
    try {
        if (PySequence_Fast_GET_SIZE(mts) != n) {
            PyErr_SetString(PyExc_ValueError, "seq_ids and max_tokens differ in length");
        } else {
            std::vector<Seq*> seqs(n);
            std::vector<int> caps(n);
            bool ok = true;
            for (Py_ssize_t i = 0; i < n && ok; ++i) {
                seqs[i] = lookup(self, PySequence_Fast_GET_ITEM(ids, i));
                if (!seqs[i]) { ok = false; break; }
                const long long mt = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(mts, i));
                if (mt == -1 && PyErr_Occurred()) { ok = false; break; }
                if (mt < 0) {
                    PyErr_SetString(PyExc_ValueError, "max_tokens must be >= 0");
                    ok = false;
                    break;
                }
                caps[i] = static_cast<int>(std::min<long long>(mt, self->index->depth()));
            }
            if (ok) {
                std::vector<Best> bests(n);
                for (Py_ssize_t i = 0; i < n; ++i) {
                    SpecParams sp = base;
                    sp.max_tokens = caps[i];
                    bests[i] = self->index->speculate(*seqs[i], sp, *self->scratch);
                }
                out = PyList_New(n);
                for (Py_ssize_t i = 0; out && i < n; ++i) {
                    PyObject* d = make_draft(self, bests[i]);
                    if (!d) {
                        Py_CLEAR(out);
                        break;
                    }
                    PyList_SET_ITEM(out, i, d);
                }
            }
        }
    } catch (const std::bad_alloc&) {
        PyErr_NoMemory();
        Py_CLEAR(out);
    }
    Py_DECREF(ids);
    Py_DECREF(mts);
    return out;
}

PyObject* core_num_global_tokens(CoreObject* self, PyObject* args) {
    int tenant;
    if (!PyArg_ParseTuple(args, "i", &tenant)) return nullptr;
    return PyLong_FromLongLong(self->index->global_tokens(tenant));
}

PyObject* core_has(CoreObject* self, PyObject* arg) {
    int64_t id;
    if (!parse_seq_id(arg, id)) return nullptr;
    return PyBool_FromLong(self->index->find(id) != nullptr);
}

PyObject* core_num_tokens(CoreObject* self, PyObject* arg) {
    Seq* s = lookup(self, arg);
    if (!s) return nullptr;
    return PyLong_FromSize_t(s->toks.size());
}

PyObject* core_num_states(CoreObject* self, PyObject* arg) {
    int64_t id;
    if (!parse_seq_id(arg, id)) return nullptr;
    return PyLong_FromSize_t(self->index->num_states(id));
}

PyMethodDef core_methods[] = {
    {"start", reinterpret_cast<PyCFunction>(core_start), METH_VARARGS, "start(seq_id, prompt, tenant_id)"},
    {"extend", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(core_extend)), METH_FASTCALL,
     "extend(seq_id, tokens)"},
    {"extend_batch", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(core_extend_batch)),
     METH_FASTCALL, "extend_batch(seq_ids, token_lists)"},
    {"stop", reinterpret_cast<PyCFunction>(core_stop), METH_VARARGS, "stop(seq_id, keep_response)"},
    {"speculate_batch", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(core_speculate_batch)),
     METH_FASTCALL, "speculate_batch(seq_ids, max_tokens, factor, min_prob) -> [draft or (tokens, score, m, probs)]"},
    {"num_global_tokens", reinterpret_cast<PyCFunction>(core_num_global_tokens), METH_VARARGS,
     "num_global_tokens(tenant_id or -1 for all)"},
    {"has", reinterpret_cast<PyCFunction>(core_has), METH_O, "has(seq_id)"},
    {"num_tokens", reinterpret_cast<PyCFunction>(core_num_tokens), METH_O, "num_tokens(seq_id)"},
    {"num_states", reinterpret_cast<PyCFunction>(core_num_states), METH_O, "local automaton states of seq_id"},
    {nullptr, nullptr, 0, nullptr},
};

PyTypeObject CoreType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyMethodDef module_methods[] = {
    {"set_draft_type", set_draft_type, METH_O, "set_draft_type(cls): speculate_batch returns cls instances"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef core_module = {PyModuleDef_HEAD_INIT, "glint_suffix_core", "Suffix-decoding index core.", -1,
                           module_methods};

}  // namespace

PyMODINIT_FUNC PyInit_glint_suffix_core(void) {
    CoreType.tp_name = "glint_suffix_core.Core";
    CoreType.tp_basicsize = sizeof(CoreObject);
    CoreType.tp_flags = Py_TPFLAGS_DEFAULT;
    CoreType.tp_doc = "Core(max_depth, max_global_tokens, compact_min=65536, compact_rate=2, compact_step=4096)";
    CoreType.tp_new = PyType_GenericNew;
    CoreType.tp_init = reinterpret_cast<initproc>(core_init);
    CoreType.tp_dealloc = reinterpret_cast<destructor>(core_dealloc);
    CoreType.tp_methods = core_methods;
    if (PyType_Ready(&CoreType) < 0) return nullptr;
    PyObject* m = PyModule_Create(&core_module);
    if (!m) return nullptr;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", reinterpret_cast<PyObject*>(&CoreType)) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return nullptr;
    }
    return m;
}

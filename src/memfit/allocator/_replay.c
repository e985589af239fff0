/* The replay of memfit.allocator.model.CachingAllocatorModel.run, compiled.

   CachingAllocatorModel (model.py) is the allocator model; this file is the same rules for the two settings
   the estimator replays (the default, and expandable_segments; no max_split_size, no garbage-collection
   threshold, no power-of-two rounding, no physical limit), written in C because a replay of tens of
   thousands of events spends most of its time in the interpreter. It keeps no Python object per block:
   blocks live in arrays, each pool's free blocks in size classes sorted by (size, address) (what the Python model
   keeps as size << 64 | address in a sorted list), the unmapped blocks of expandable segments in one sorted
   by address. Function by function it follows model.py (whose docstrings cite the PyTorch source lines):

     do_malloc        malloc: round to 512 bytes (at least 512); <= 1 MiB the small pool, else the large;
                      get_free_block; if none, a new segment (2 MiB small; large: the large segment below
                      10 MiB, else the request rounded up to 2 MiB) unless the reserve would pass the limit:
                      then release_cached_blocks, num_alloc_retries += 1, the same check again, and failing
                      it out of memory (num_ooms += 1: the replay stops at that event); alloc_found_block's
                      split (the rest >= 512 B in the small pool or with expandable segments, > 1 MiB in the
                      large pool);
     get_free_block   best fit, lowest address among equal sizes; expandable blocks compare by the size
                      they could grow to;
     do_free          free_block / try_merge_blocks with mapped free neighbours;
     release_cached   release_cached_blocks: whole-segment cached blocks given back; expandable: the whole
                      free pages of every cached block unmapped, a segment left wholly unmapped dropped;
     find_expandable_block, alloc_expandable (try_allocate_expandable_block), map_block, unmap_block:
                      expandable segments as model.py has them (1 1/8 of the device's memory of address
                      space each, pages of 2 MiB small / the large segment size large).
   New ordinary small segments take increasing addresses, large ones decreasing (model.py says why), or
   increasing with large_up (model.py's large_addresses="up").

   tests/test_allocator_fast.py replays random streams and the estimator's own through both under many
   limits and compares every figure; MEMFIT_PURE_PYTHON=1 makes memfit use the Python model only. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#ifndef _WIN32
#include <pthread.h>
#endif

/* an error set from the replay's loop, which runs without the GIL on the estimator's streams (another thread
   may replay the same stream in the other order meanwhile): taken for the call, as PyGILState_Ensure allows */
#define SETERR(call)                                   \
    do {                                               \
        PyGILState_STATE gil_ = PyGILState_Ensure();   \
        (void)(call);                                  \
        PyGILState_Release(gil_);                      \
    } while (0)

#define MIN_BLOCK 512LL
#define SMALL_REQUEST (1LL << 20)
#define SMALL_SEGMENT (2LL << 20)
#define MIN_LARGE_ALLOC (10LL << 20)
#define ROUND_LARGE (2LL << 20)
#define MAX_REQUEST (1LL << 56)
#define MAX_RESERVE (1LL << 61)

typedef struct {
    int64_t size, addr, requested;
    int32_t prev, next; /* block ids, -1: none */
    int32_t seg;        /* expandable segment index, -1: an ordinary segment's block */
    uint8_t small, allocated, mapped;
} Blk;

typedef struct {
    int64_t base, page, size;
} Seg;

typedef struct State State;

typedef struct {
    int64_t size, addr;
    int32_t id;
} Ent;

/* a pool's free blocks ordered by (size, address), bucketed by size class: a class holds the blocks of one
   range of sizes (each size below 32 KiB its own; above, 32 classes per power of two) sorted by (size,
   address), in chunks of at most CHUNK entries, and a bitmap says which classes hold any. The best fit is a
   search in the request's class and, where that class holds nothing large enough, the first entry of the next
   class the bitmap names; an insert or a removal moves the tail of one chunk. (A training step's large pool
   holds hundreds of free blocks, a deep model's thousands of one size; one sorted array of them spent most of
   the replay moving its tail, sorted chunks of all of them a third of it in their searches.) */
#define NCLASS 1600
#define NWORDS ((NCLASS + 63) / 64)
#define CHUNK 24
/* A pool of few free blocks (a decode's, most of a training step's small pool) keeps them in one sorted array
   instead: its blocks change size class at nearly every free and malloc, so the classes' chunks were made and
   emptied all the time. Past FLAT_MAX blocks the pool moves to the classes for good. */
#define FLAT_MAX 48
typedef struct {
    Py_ssize_t n;
    Ent e[CHUNK];
} Chunk;

typedef struct {
    Chunk **ch;   /* the class's chunks in order, none empty: &first while there is at most one (NULL: never used) */
    Chunk *first; /* the directory of a class of one chunk */
    Chunk *spare; /* the class's last chunk, kept when it emptied (classes empty and fill again all the time) */
    int32_t nch, capch;
} Cls;

typedef struct {
    State *owner;
    Cls *cls;              /* NCLASS classes (NULL until the first insert) */
    uint64_t bits[NWORDS]; /* bit c: class c holds a block */
    uint64_t top;          /* bit w: bits[w] is not 0 */
    Py_ssize_t n;          /* free blocks in all */
    int classed;           /* 0: the blocks are in `flat`, one sorted array; 1: in the classes */
    Ent *flat;             /* while not classed: the free blocks sorted by (size, address), room for FLAT_MAX */
    int32_t *unm; /* expandable segments: the unmapped blocks, by address */
    Py_ssize_t nunm, capunm;
} Pool;

struct State {
    Blk *b;
    Py_ssize_t n, cap;
    Pool small, large;
    int32_t *handle; /* handle -> block id, -1: none */
    Py_ssize_t nhandles;
    int64_t allocated, reserved, requested;
    int64_t peak_allocated, peak_reserved, peak_requested;
    int64_t num_segments, peak_segments, num_allocations;
    int64_t num_alloc_retries, num_ooms, num_device_alloc, num_device_free;
    int64_t next_addr, large_addr; /* small: the next segment's address; large: the last one's (down) or the next's (up) */
    int expandable, large_up;
    int64_t address_space; /* an expandable segment's address space (1 1/8 of the device's memory) */
    Seg *segs;
    Py_ssize_t nsegs, capsegs;
    int32_t *dead; /* ids of blocks merged into a neighbour or given back: new_block takes them first */
    Py_ssize_t ndead, capdead;
};

/* room for `need` elements of `elem` bytes in the array *a of capacity *cap (doubling, from `first`);
   0, or -1 when the memory is not there */
static int grow(void **a, Py_ssize_t *cap, Py_ssize_t need, size_t elem, Py_ssize_t first) {
    if (need <= *cap) return 0;
    Py_ssize_t n = *cap ? *cap : first;
    while (n < need) n *= 2;
    void *b = PyMem_RawRealloc(*a, (size_t)n * elem);
    if (!b) return -1;
    *a = b;
    *cap = n;
    return 0;
}

static inline int ent_less(const Ent *e, int64_t size, int64_t addr) {
    return e->size < size || (e->size == size && e->addr < addr);
}

/* the n entries from e one place up (to e + 1) / the n entries after e one place down (onto e): a loop for
   the few a class usually holds, memmove past that */
static inline void ent_shift_up(Ent *e, Py_ssize_t n) {
    if (n > 8) {
        memmove(e + 1, e, (size_t)n * sizeof(Ent));
        return;
    }
    for (Py_ssize_t j = n; j > 0; j--) e[j] = e[j - 1];
}

static inline void ent_shift_down(Ent *e, Py_ssize_t n) {
    if (n > 8) {
        memmove(e, e + 1, (size_t)n * sizeof(Ent));
        return;
    }
    for (Py_ssize_t j = 0; j < n; j++) e[j] = e[j + 1];
}

/* the class of a block of `size` bytes: non-decreasing in the size */
static inline int size_class(int64_t size) {
    uint64_t u = (uint64_t)size >> 9;
    if (u < 64) return (int)u;
    int m = 63 - __builtin_clzll(u);
    if (m > 52) return NCLASS - 1;
    return 64 + (m - 6) * 32 + (int)((u >> (m - 5)) & 31);
}

/* the first class >= c that holds a block, -1: none */
static inline int next_class(const Pool *p, int c) {
    if (c >= NCLASS) return -1;
    int w = c >> 6;
    uint64_t x = p->bits[w] & (~0ULL << (c & 63));
    if (x) return (w << 6) + __builtin_ctzll(x);
    uint64_t t = p->top & (~0ULL << (w + 1)); /* w + 1 <= NWORDS < 64 */
    if (!t) return -1;
    w = __builtin_ctzll(t);
    return (w << 6) + __builtin_ctzll(p->bits[w]);
}

/* the first of the n sorted entries e whose key is >= (size, addr) (n: none) */
static inline Py_ssize_t ents_lower(const Ent *e, Py_ssize_t n, int64_t size, int64_t addr) {
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) >> 1;
        if (ent_less(&e[mid], size, addr))
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* the first entry of chunk c whose key is >= (size, addr) (c->n: none) */
static inline Py_ssize_t entry_lower(const Chunk *c, int64_t size, int64_t addr) {
    return ents_lower(c->e, c->n, size, addr);
}

/* the first chunk of class k whose last key is >= (size, addr) (k->nch: none) */
static inline int32_t chunk_lower(const Cls *k, int64_t size, int64_t addr) {
    int32_t lo = 0, hi = k->nch;
    while (lo < hi) {
        int32_t mid = (lo + hi) >> 1;
        const Chunk *c = k->ch[mid];
        if (ent_less(&c->e[c->n - 1], size, addr))
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* a new empty chunk at index i of class k; NULL when the memory is not there */
static Chunk *chunk_new(Cls *k, int32_t i) {
    if (k->nch + 1 > k->capch) {
        int32_t cap = k->capch > 1 ? 2 * k->capch : 4;
        Chunk **d = PyMem_RawMalloc((size_t)cap * sizeof(Chunk *));
        if (!d) return NULL;
        memcpy(d, k->ch, (size_t)k->nch * sizeof(Chunk *));
        if (k->ch != &k->first) PyMem_RawFree(k->ch);
        k->ch = d;
        k->capch = cap;
    }
    Chunk *c = k->spare;
    if (c)
        k->spare = NULL;
    else if (!(c = PyMem_RawMalloc(sizeof(Chunk))))
        return NULL;
    c->n = 0;
    memmove(k->ch + i + 1, k->ch + i, (size_t)(k->nch - i) * sizeof(Chunk *));
    k->ch[i] = c;
    k->nch++;
    return c;
}

/* the block's (size, addr) is its key: set before it goes in, unchanged until it comes out */
static int cls_insert(Pool *p, int32_t id) {
    if (!p->cls && !(p->cls = PyMem_RawCalloc(NCLASS, sizeof(Cls)))) return -1;
    const Blk *b = &p->owner->b[id];
    int64_t size = b->size, addr = b->addr;
    int c = size_class(size);
    Cls *k = &p->cls[c];
    if (!k->ch) { /* the class's first block: its directory is `first` (only classes that held one are read) */
        k->ch = &k->first;
        k->capch = 1;
    }
    int32_t ci = chunk_lower(k, size, addr);
    if (ci == k->nch) {
        if (ci == 0 || k->ch[ci - 1]->n == CHUNK) { /* after every key: a new last chunk, or the last one's end */
            if (!chunk_new(k, ci)) return -1;
        } else {
            ci--;
        }
    }
    Chunk *ck = k->ch[ci];
    if (ck->n == CHUNK) { /* split it: its upper half into a new chunk after it */
        Chunk *d = chunk_new(k, ci + 1);
        if (!d) return -1;
        ck = k->ch[ci];
        d->n = CHUNK / 2;
        memcpy(d->e, ck->e + CHUNK / 2, (CHUNK / 2) * sizeof(Ent));
        ck->n = CHUNK / 2;
        if (ent_less(&ck->e[ck->n - 1], size, addr)) ck = d;
    }
    Py_ssize_t i = ck->n ? entry_lower(ck, size, addr) : 0;
    ent_shift_up(ck->e + i, ck->n - i);
    ck->e[i].size = size;
    ck->e[i].addr = addr;
    ck->e[i].id = id;
    ck->n++;
    if (k->nch == 1 && ck->n == 1) {
        p->bits[c >> 6] |= 1ULL << (c & 63);
        p->top |= 1ULL << (c >> 6);
    }
    p->n++;
    return 0;
}

/* entry i of chunk ci of class c out of the pool */
static void cls_remove_at(Pool *p, int c, int32_t ci, Py_ssize_t i) {
    Cls *k = &p->cls[c];
    Chunk *ck = k->ch[ci];
    ent_shift_down(ck->e + i, ck->n - i - 1);
    p->n--;
    if (--ck->n == 0) {
        if (k->spare)
            PyMem_RawFree(ck);
        else
            k->spare = ck;
        memmove(k->ch + ci, k->ch + ci + 1, (size_t)(k->nch - ci - 1) * sizeof(Chunk *));
        if (--k->nch == 0) {
            p->bits[c >> 6] &= ~(1ULL << (c & 63));
            if (!p->bits[c >> 6]) p->top &= ~(1ULL << (c >> 6));
        }
    }
}

static void cls_remove(Pool *p, int32_t id) {
    const Blk *b = &p->owner->b[id];
    int c = size_class(b->size);
    const Cls *k = &p->cls[c];
    int32_t ci = chunk_lower(k, b->size, b->addr);
    cls_remove_at(p, c, ci, entry_lower(k->ch[ci], b->size, b->addr));
}

/* where lower_bound(size) is: the class, chunk and entry of the smallest block of at least `size` bytes
   (lowest address among equals); 0, or -1: none */
static inline int cls_find(const Pool *p, int64_t size, int *cp, int32_t *chp, Py_ssize_t *ip) {
    if (!p->n) return -1;
    int c = size_class(size);
    const Cls *k = &p->cls[c];
    if (k->nch) {
        int32_t ci = chunk_lower(k, size, INT64_MIN);
        if (ci < k->nch) {
            *cp = c;
            *chp = ci;
            *ip = entry_lower(k->ch[ci], size, INT64_MIN);
            return 0;
        }
    }
    c = next_class(p, c + 1);
    if (c < 0) return -1;
    *cp = c;
    *chp = 0;
    *ip = 0;
    return 0;
}

static int32_t cls_next(const Pool *p, int32_t x);
static Py_ssize_t cls_ids(const Pool *p, int32_t *out);

/* the first entry of the flat array whose key is >= (size, addr) (p->n: none) */
static inline Py_ssize_t flat_lower(const Pool *p, int64_t size, int64_t addr) {
    return ents_lower(p->flat, p->n, size, addr);
}

/* the flat array's blocks into the classes, for good (the pool passed FLAT_MAX); -1 when the memory is not there */
static int to_classes(Pool *p) {
    if (!p->cls && !(p->cls = PyMem_RawCalloc(NCLASS, sizeof(Cls)))) return -1;
    Py_ssize_t n = p->n;
    p->classed = 1;
    p->n = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (cls_insert(p, p->flat[i].id) < 0) return -1;
    PyMem_RawFree(p->flat);
    p->flat = NULL;
    return 0;
}

/* the block's (size, addr) is its key: set before it goes in, unchanged until it comes out */
static int pool_insert(Pool *p, int32_t id) {
    if (p->classed) return cls_insert(p, id);
    if (p->n == FLAT_MAX) {
        if (to_classes(p) < 0) return -1;
        return cls_insert(p, id);
    }
    if (!p->flat && !(p->flat = PyMem_RawMalloc(FLAT_MAX * sizeof(Ent)))) return -1;
    const Blk *b = &p->owner->b[id];
    Py_ssize_t i = flat_lower(p, b->size, b->addr);
    ent_shift_up(p->flat + i, p->n - i);
    p->flat[i].size = b->size;
    p->flat[i].addr = b->addr;
    p->flat[i].id = id;
    p->n++;
    return 0;
}

/* the entry pool_find named out of the pool (c -1: entry i of the flat array) */
static inline void pool_remove_at(Pool *p, int c, int32_t ci, Py_ssize_t i) {
    if (c >= 0) {
        cls_remove_at(p, c, ci, i);
        return;
    }
    ent_shift_down(p->flat + i, p->n - i - 1);
    p->n--;
}

static void pool_remove(Pool *p, int32_t id) {
    if (p->classed) {
        cls_remove(p, id);
        return;
    }
    const Blk *b = &p->owner->b[id];
    pool_remove_at(p, -1, 0, flat_lower(p, b->size, b->addr));
}

/* where lower_bound(size) is: the class, chunk and entry of the smallest block of at least `size` bytes
   (lowest address among equals; class -1: entry *ip of the flat array); 0, or -1: none */
static inline int pool_find(const Pool *p, int64_t size, int *cp, int32_t *chp, Py_ssize_t *ip) {
    if (p->classed) return cls_find(p, size, cp, chp, ip);
    Py_ssize_t i = flat_lower(p, size, INT64_MIN);
    if (i >= p->n) return -1;
    *cp = -1;
    *chp = 0;
    *ip = i;
    return 0;
}

/* the block after x (in the pool) in the pool's order, -1: none */
static int32_t pool_next(const Pool *p, int32_t x) {
    if (p->classed) return cls_next(p, x);
    const Blk *b = &p->owner->b[x];
    Py_ssize_t i = flat_lower(p, b->size, b->addr) + 1;
    return i < p->n ? p->flat[i].id : -1;
}

/* the pool's blocks in order into out (room for p->n); returns their count */
static Py_ssize_t pool_ids(const Pool *p, int32_t *out) {
    if (p->classed) return cls_ids(p, out);
    for (Py_ssize_t i = 0; i < p->n; i++) out[i] = p->flat[i].id;
    return p->n;
}

/* lower_bound(size): the smallest block of at least `size` bytes (lowest address among equals), -1: none */
static int32_t pool_lower(const Pool *p, int64_t size) {
    int c;
    int32_t ci;
    Py_ssize_t i;
    if (pool_find(p, size, &c, &ci, &i) < 0) return -1;
    return c >= 0 ? p->cls[c].ch[ci]->e[i].id : p->flat[i].id;
}

/* pool_lower(size) taken out of the pool in the same search, -1: none */
static int32_t pool_take_lower(Pool *p, int64_t size) {
    int c;
    int32_t ci;
    Py_ssize_t i;
    if (pool_find(p, size, &c, &ci, &i) < 0) return -1;
    int32_t id = c >= 0 ? p->cls[c].ch[ci]->e[i].id : p->flat[i].id;
    pool_remove_at(p, c, ci, i);
    return id;
}

/* the block after x (in the pool) in the pool's order, -1: none */
static int32_t cls_next(const Pool *p, int32_t x) {
    const Blk *b = &p->owner->b[x];
    int c = size_class(b->size);
    const Cls *k = &p->cls[c];
    int32_t ci = chunk_lower(k, b->size, b->addr);
    const Chunk *ck = k->ch[ci];
    Py_ssize_t i = entry_lower(ck, b->size, b->addr) + 1;
    if (i < ck->n) return ck->e[i].id;
    if (ci + 1 < k->nch) return k->ch[ci + 1]->e[0].id;
    c = next_class(p, c + 1);
    return c < 0 ? -1 : p->cls[c].ch[0]->e[0].id;
}

/* the pool's blocks in order into out (room for p->n); returns their count */
static Py_ssize_t cls_ids(const Pool *p, int32_t *out) {
    Py_ssize_t n = 0;
    for (int c = next_class(p, 0); c >= 0; c = next_class(p, c + 1)) {
        const Cls *k = &p->cls[c];
        for (int32_t ci = 0; ci < k->nch; ci++)
            for (Py_ssize_t i = 0; i < k->ch[ci]->n; i++) out[n++] = k->ch[ci]->e[i].id;
    }
    return n;
}

static void pool_free(Pool *p) {
    if (p->cls)
        for (int c = 0; c < NCLASS; c++) {
            Cls *k = &p->cls[c];
            for (int32_t ci = 0; ci < k->nch; ci++) PyMem_RawFree(k->ch[ci]);
            PyMem_RawFree(k->spare);
            if (k->ch && k->ch != &k->first) PyMem_RawFree(k->ch);
        }
    PyMem_RawFree(p->cls);
    PyMem_RawFree(p->flat);
    PyMem_RawFree(p->unm);
}

/* a block in the array: a dead one's id again where there is one (the array stays about as large as the
   blocks alive, so its lines stay in cache; no figure depends on an id), else a new one; -1 when the memory is
   not there */
static int32_t new_block(State *s, int64_t size, int64_t addr, int small, int32_t prev, int32_t next, int32_t seg,
                         int mapped) {
    int32_t id;
    if (s->ndead) {
        id = s->dead[--s->ndead];
    } else {
        if (grow((void **)&s->b, &s->cap, s->n + 1, sizeof(Blk), 1024) < 0) return -1;
        id = (int32_t)s->n++;
    }
    Blk *k = &s->b[id];
    k->size = size;
    k->addr = addr;
    k->requested = 0;
    k->prev = prev;
    k->next = next;
    k->seg = seg;
    k->small = (uint8_t)small;
    k->allocated = 0;
    k->mapped = (uint8_t)mapped;
    return id;
}

/* block `id` is referenced no more (merged into a neighbour, or its segment given back): its id for reuse */
static int dead_block(State *s, int32_t id) {
    if (grow((void **)&s->dead, &s->capdead, s->ndead + 1, sizeof(int32_t), 256) < 0) return -1;
    s->dead[s->ndead++] = id;
    return 0;
}

/* ------------------------------------------------------------------ expandable segments' unmapped blocks */
static Py_ssize_t unm_lower(const State *s, const Pool *p, int64_t addr) {
    Py_ssize_t lo = 0, hi = p->nunm;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) >> 1;
        if (s->b[p->unm[mid]].addr < addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static int unm_insert(State *s, Pool *p, int32_t id) {
    if (grow((void **)&p->unm, &p->capunm, p->nunm + 1, sizeof(int32_t), 16) < 0) return -1;
    Py_ssize_t i = unm_lower(s, p, s->b[id].addr);
    memmove(p->unm + i + 1, p->unm + i, (size_t)(p->nunm - i) * sizeof(int32_t));
    p->unm[i] = id;
    p->nunm++;
    return 0;
}

/* del pool.unmapped[addr]; -1 when no unmapped block is there (a state the model never reaches) */
static int unm_remove(State *s, Pool *p, int64_t addr) {
    Py_ssize_t i = unm_lower(s, p, addr);
    if (i >= p->nunm || s->b[p->unm[i]].addr != addr) {
        SETERR(PyErr_SetString(PyExc_RuntimeError, "allocator replay: no unmapped block at that address"));
        return -1;
    }
    memmove(p->unm + i, p->unm + i + 1, (size_t)(p->nunm - i - 1) * sizeof(int32_t));
    p->nunm--;
    return 0;
}

/* _merge: dst absorbs its free neighbour src (mapped like it) */
static int merge(State *s, int32_t dst, int32_t src, Pool *p) {
    Blk *d = &s->b[dst], *q = &s->b[src];
    if (q->mapped)
        pool_remove(p, src);
    else if (unm_remove(s, p, q->addr) < 0)
        return -1;
    if (d->prev == src) {
        d->addr = q->addr;
        d->prev = q->prev;
        if (q->prev >= 0) s->b[q->prev].next = dst;
    } else {
        d->next = q->next;
        if (q->next >= 0) s->b[q->next].prev = dst;
    }
    d->size += q->size;
    if (dead_block(s, src) < 0) {
        SETERR(PyErr_NoMemory());
        return -1;
    }
    return 0;
}

static int try_merge(State *s, int32_t dst, int32_t src, Pool *p) {
    if (src < 0 || s->b[src].allocated || s->b[src].mapped != s->b[dst].mapped) return 0;
    return merge(s, dst, src, p);
}

/* map_block: map the pages covering the first `size` bytes of unmapped block `id`; 0 when none (nbytes 0) */
static int map_block(State *s, int32_t id, int64_t size, Pool *p) {
    Blk *k = &s->b[id];
    const Seg *g = &s->segs[k->seg];
    int64_t off = k->addr - g->base, page = g->page;
    int64_t begin = off / page, end = (off + size + page - 1) / page;
    int64_t nbytes = (end - begin) * page;
    if (nbytes == 0) return 0;
    if (unm_remove(s, p, k->addr) < 0) return -1;
    k->mapped = 1;
    if (nbytes < k->size) {
        int32_t rest = new_block(s, k->size - nbytes, k->addr + nbytes, k->small, id, k->next, k->seg, 0);
        if (rest < 0) return -2;
        k = &s->b[id];
        if (k->next >= 0) s->b[k->next].prev = rest;
        k->next = rest;
        if (unm_insert(s, p, rest) < 0) return -2;
        k->size = nbytes;
    }
    int32_t prev = k->prev;
    if (prev >= 0 && !s->b[prev].allocated && s->b[prev].mapped && merge(s, id, prev, p) < 0) return -1;
    int32_t nxt = s->b[id].next;
    if (nxt >= 0 && !s->b[nxt].allocated && s->b[nxt].mapped && merge(s, id, nxt, p) < 0) return -1;
    k = &s->b[id];
    if (pool_insert(p, id) < 0) return -2;
    s->reserved += nbytes;
    if (s->reserved > s->peak_reserved) s->peak_reserved = s->reserved;
    s->num_device_alloc++;
    return 1;
}

/* unmap_block: unmap the whole pages inside free block `id`; what is left either side stays free */
static int unmap_block(State *s, int32_t id, Pool *p) {
    Blk *k = &s->b[id];
    const Seg *g = &s->segs[k->seg];
    int64_t page = g->page, off = k->addr - g->base;
    int64_t begin = (off + page - 1) / page, end = (off + k->size) / page;
    if (begin >= end) return 0;
    pool_remove(p, id);
    int64_t start = g->base + begin * page, length = (end - begin) * page;
    int64_t before = start - k->addr, after = k->size - before - length;
    if (before > 0) {
        int32_t bf = new_block(s, before, k->addr, k->small, k->prev, id, k->seg, 1);
        if (bf < 0) return -2;
        k = &s->b[id];
        if (k->prev >= 0) s->b[k->prev].next = bf;
        k->prev = bf;
        if (pool_insert(p, bf) < 0) return -2;
    }
    if (after > 0) {
        int32_t af = new_block(s, after, start + length, k->small, id, k->next, k->seg, 1);
        if (af < 0) return -2;
        k = &s->b[id];
        if (k->next >= 0) s->b[k->next].prev = af;
        k->next = af;
        if (pool_insert(p, af) < 0) return -2;
    }
    k = &s->b[id];
    k->addr = start;
    k->size = length;
    k->mapped = 0;
    if (try_merge(s, id, k->prev, p) < 0) return -1;
    if (try_merge(s, id, s->b[id].next, p) < 0) return -1;
    if (unm_insert(s, p, id) < 0) return -2;
    s->reserved -= length;
    s->num_device_free++;
    return 0;
}

/* find_expandable_block: the lowest unmapped range (with the free block before it) with room for `size`;
   else a new expandable segment */
static int32_t find_expandable_block(State *s, Pool *p, int64_t size, int small, int64_t large_segment) {
    for (Py_ssize_t i = 0; i < p->nunm; i++) {
        int32_t c = p->unm[i];
        int32_t q = s->b[c].prev;
        if (q >= 0 && !s->b[q].allocated) c = q;
        int64_t room = 0;
        int32_t b = c;
        while (room < size && b >= 0 && !s->b[b].allocated) {
            room += s->b[b].size;
            b = s->b[b].next;
        }
        if (room >= size) return c;
    }
    int64_t page = small ? SMALL_SEGMENT : large_segment;
    if (grow((void **)&s->segs, &s->capsegs, s->nsegs + 1, sizeof(Seg), 8) < 0) return -2;
    Seg *g = &s->segs[s->nsegs];
    g->base = s->next_addr;
    g->page = page;
    g->size = page * ((s->address_space + page - 1) / page);
    s->next_addr += g->size + page;
    int32_t c = new_block(s, g->size, g->base, small, -1, -1, (int32_t)s->nsegs, 0);
    s->nsegs++;
    if (c < 0 || unm_insert(s, p, c) < 0) return -2;
    return c;
}

/* try_allocate_expandable_block: map pages at the lowest address with room; the block, out of the pool */
static int32_t alloc_expandable(State *s, Pool *p, int64_t size, int small, int64_t large_segment) {
    int32_t c = find_expandable_block(s, p, size, small, large_segment);
    if (c < 0) return c;
    if (!s->b[c].mapped) {
        int64_t want = s->b[c].size < size ? s->b[c].size : size;
        int r = map_block(s, c, want, p);
        if (r == 0) SETERR(PyErr_SetString(PyExc_RuntimeError, "allocator replay: nothing to map"));
        if (r <= 0) return r == -2 ? -2 : -1;
    }
    while (s->b[c].size < size) {
        int32_t nxt = s->b[c].next;
        if (nxt < 0 || s->b[nxt].mapped) {
            SETERR(PyErr_SetString(PyExc_RuntimeError, "allocator replay: no unmapped pages after the block"));
            return -1;
        }
        int64_t want = size - s->b[c].size;
        if (s->b[nxt].size < want) want = s->b[nxt].size;
        int r = map_block(s, nxt, want, p);
        if (r == 0) SETERR(PyErr_SetString(PyExc_RuntimeError, "allocator replay: nothing to map"));
        if (r <= 0) return r == -2 ? -2 : -1;
        c = nxt;
    }
    pool_remove(p, c);
    return c;
}

/* release_cached_blocks: give back every cached block that is a whole segment; with expandable segments,
   unmap the whole free pages of every cached block (and drop a segment left wholly unmapped) */
static int release_cached(State *s) {
    Pool *pools[2] = {&s->large, &s->small};
    for (int j = 0; j < 2; j++) {
        Pool *p = pools[j];
        Py_ssize_t n = p->n;
        if (n == 0) continue;
        int32_t *ids = PyMem_RawMalloc((size_t)n * sizeof(int32_t)); /* the blocks in order */
        if (!ids) return -2;
        pool_ids(p, ids);
        for (Py_ssize_t i = 0; i < n; i++) {
            int32_t id = ids[i];
            if (!s->expandable) {
                Blk *k = &s->b[id];
                if (k->prev < 0 && k->next < 0) {
                    pool_remove(p, id);
                    s->reserved -= k->size;
                    s->num_segments--;
                    s->num_device_free++;
                    if (dead_block(s, id) < 0) {
                        PyMem_RawFree(ids);
                        return -2;
                    }
                }
                continue;
            }
            int r = unmap_block(s, id, p);
            if (r < 0) {
                PyMem_RawFree(ids);
                return r;
            }
            Blk *k = &s->b[id];
            if (k->prev < 0 && k->next < 0 && !k->mapped && unm_remove(s, p, k->addr) < 0) {
                PyMem_RawFree(ids);
                return -1;
            }
        }
        PyMem_RawFree(ids);
    }
    return 0;
}

static int set_handle(State *s, int64_t h, int32_t id) {
    if (h < 0) {
        SETERR(PyErr_SetString(PyExc_ValueError, "negative handle"));
        return -1;
    }
    if (h >= s->nhandles) {
        Py_ssize_t was = s->nhandles;
        if (grow((void **)&s->handle, &s->nhandles, (Py_ssize_t)h + 1, sizeof(int32_t), 1024) < 0) {
            SETERR(PyErr_NoMemory());
            return -1;
        }
        for (Py_ssize_t i = was; i < s->nhandles; i++) s->handle[i] = -1;
    }
    s->handle[h] = id;
    return 0;
}

static void free_state(State *s) {
    PyMem_RawFree(s->b);
    pool_free(&s->small);
    pool_free(&s->large);
    PyMem_RawFree(s->handle);
    PyMem_RawFree(s->segs);
    PyMem_RawFree(s->dead);
}

/* get_free_block: the smallest free block large enough; expandable blocks compare by the size they could grow
   to (themselves plus the unmapped pages right after them): one before unmapped pages is passed over when
   a tighter one follows */
static int32_t get_free_block(State *s, Pool *p, int64_t size) {
    int32_t b = pool_lower(p, size);
    if (b < 0 || !s->expandable) return b;
#define GROW(x) (s->b[x].size + (s->b[x].next >= 0 && !s->b[s->b[x].next].mapped ? s->b[s->b[x].next].size : 0))
    int64_t grow = GROW(b);
    for (int32_t c = pool_next(p, b); c >= 0; c = pool_next(p, c)) {
        int64_t cgrow = GROW(c);
        if (cgrow >= grow) break;
        b = c;
        grow = cgrow;
    }
#undef GROW
    return b;
}

static int nomem(int r) {
    if (r == -2) SETERR(PyErr_NoMemory());
    return -1;
}

/* malloc of one request; returns 0, 1 when out of memory under the limit, -1 on error */
static int do_malloc(State *s, int64_t h, int64_t nbytes, int64_t limit, int64_t large_segment) {
    if (nbytes < 0 || nbytes > MAX_REQUEST || s->reserved > MAX_RESERVE) {
        /* past what 64-bit figures hold safely: the caller falls back to the Python model (exact integers) */
        SETERR(PyErr_SetString(PyExc_OverflowError, "allocator replay: request or reserve too large for the compiled replay"));
        return -1;
    }
    int64_t size = nbytes < MIN_BLOCK ? MIN_BLOCK : (nbytes + 511) & ~511LL;
    int small = size <= SMALL_REQUEST;
    Pool *p = small ? &s->small : &s->large;
    int32_t id;
    if (s->expandable) {
        id = get_free_block(s, p, size);
        if (id >= 0) pool_remove(p, id);
    } else {
        id = pool_take_lower(p, size); /* get_free_block and its removal, one search */
    }
    if (id < 0) {
        int64_t alloc_size;
        if (small)
            alloc_size = SMALL_SEGMENT;
        else if (size < MIN_LARGE_ALLOC)
            alloc_size = large_segment;
        else
            alloc_size = (size + ROUND_LARGE - 1) / ROUND_LARGE * ROUND_LARGE;
        if (s->reserved + alloc_size > limit) {
            int r = release_cached(s);
            if (r < 0) return nomem(r);
            s->num_alloc_retries++;
            if (s->reserved + alloc_size > limit) {
                s->num_ooms++;
                return 1;
            }
        }
        if (s->expandable) {
            id = alloc_expandable(s, p, size, small, large_segment);
            if (id < 0) return nomem(id);
        } else {
            int64_t addr;
            if (small) {
                addr = s->next_addr;
                s->next_addr += alloc_size;
            } else if (s->large_up) {
                addr = s->large_addr;
                s->large_addr += alloc_size;
            } else {
                s->large_addr -= alloc_size;
                addr = s->large_addr;
            }
            id = new_block(s, alloc_size, addr, small, -1, -1, -1, 1);
            if (id < 0) return nomem(-2);
            s->reserved += alloc_size;
            if (s->reserved > s->peak_reserved) s->peak_reserved = s->reserved;
            s->num_segments++;
            if (s->num_segments > s->peak_segments) s->peak_segments = s->num_segments;
            s->num_device_alloc++;
        }
    }
    Blk *k = &s->b[id];
    int64_t remaining = k->size - size;
    if ((small || s->expandable) ? remaining >= MIN_BLOCK : remaining > SMALL_REQUEST) {
        int32_t nxt = k->next;
        int32_t rest = new_block(s, remaining, k->addr + size, small, id, nxt, k->seg, 1);
        if (rest < 0) return nomem(-2);
        k = &s->b[id]; /* the array may have moved */
        if (nxt >= 0) s->b[nxt].prev = rest;
        k->next = rest;
        k->size = size;
        if (pool_insert(p, rest) < 0) return nomem(-2);
    }
    k->allocated = 1;
    k->requested = nbytes;
    s->allocated += k->size;
    s->requested += nbytes;
    s->num_allocations++;
    if (s->allocated > s->peak_allocated) s->peak_allocated = s->allocated;
    if (s->requested > s->peak_requested) s->peak_requested = s->requested;
    return set_handle(s, h, id);
}

static int do_free(State *s, int64_t h) {
    if (h < 0 || h >= s->nhandles || s->handle[h] < 0) {
        SETERR(PyErr_Format(PyExc_KeyError, "%lld", (long long)h));
        return -1;
    }
    int32_t id = s->handle[h];
    s->handle[h] = -1;
    Blk *k = &s->b[id];
    if (!k->allocated) {
        SETERR(PyErr_SetString(PyExc_ValueError, "block freed twice"));
        return -1;
    }
    Pool *p = k->small ? &s->small : &s->large;
    k->allocated = 0;
    s->allocated -= k->size;
    s->requested -= k->requested;
    s->num_allocations--;
    k->requested = 0;
    int32_t prev = k->prev;
    if (prev >= 0 && !s->b[prev].allocated && s->b[prev].mapped) {
        Blk *q = &s->b[prev];
        pool_remove(p, prev);
        k->addr = q->addr;
        k->size += q->size;
        k->prev = q->prev;
        if (q->prev >= 0) s->b[q->prev].next = id;
        if (dead_block(s, prev) < 0) {
            SETERR(PyErr_NoMemory());
            return -1;
        }
    }
    int32_t nxt = k->next;
    if (nxt >= 0 && !s->b[nxt].allocated && s->b[nxt].mapped) {
        Blk *q = &s->b[nxt];
        pool_remove(p, nxt);
        k->size += q->size;
        k->next = q->next;
        if (q->next >= 0) s->b[q->next].prev = id;
        if (dead_block(s, nxt) < 0) {
            SETERR(PyErr_NoMemory());
            return -1;
        }
    }
    if (pool_insert(p, id) < 0) {
        SETERR(PyErr_NoMemory());
        return -1;
    }
    return 0;
}

static int64_t item_int(PyObject *t, Py_ssize_t i) {
    return PyLong_AsLongLong(PyTuple_GET_ITEM(t, i));
}

/* a fresh allocator state */
static void state_init(State *s, int large_up, int expandable, int64_t address_space) {
    memset(s, 0, sizeof *s);
    s->next_addr = 1LL << 20;
    s->large_up = large_up;
    s->large_addr = large_up ? 1LL << 50 : 1LL << 62;
    s->expandable = expandable;
    s->small.owner = s->large.owner = s;
    s->address_space = address_space;
}

/* the replay of n flat operations (four int64 each) without touching a Python object (errors: SETERR):
   0 done (*failed: the request that ran out of memory, -1 none), 1 stopped by *cancel, -1 error */
static int run_flat(State *s, const int64_t *q, Py_ssize_t n, int64_t limit, int64_t large_segment,
                    volatile const char *cancel, Py_ssize_t *failed) {
    *failed = -1;
    for (Py_ssize_t idx = 0; idx < n; idx++, q += 4) {
        if (cancel && (idx & 255) == 0 && cancel[0]) return 1;
        if (q[0] == 0) {
            int r = do_malloc(s, q[1], q[2], limit, large_segment);
            if (r < 0) return -1;
            if (r == 1) {
                *failed = idx;
                return 0;
            }
        } else if (q[0] == 1) {
            if (do_free(s, q[1]) < 0) return -1;
        }
    }
    return 0;
}

static PyObject *result_of(const State *s, Py_ssize_t failed) {
    return Py_BuildValue("(nLLLLLLLLLLLLL)", failed, (long long)s->allocated, (long long)s->reserved,
                         (long long)s->requested, (long long)s->peak_allocated, (long long)s->peak_reserved,
                         (long long)s->peak_requested, (long long)s->num_segments, (long long)s->peak_segments,
                         (long long)s->num_allocations, (long long)s->num_alloc_retries, (long long)s->num_ooms,
                         (long long)s->num_device_alloc, (long long)s->num_device_free);
}

PyDoc_STRVAR(replay_doc,
"replay(ops, limit, large_segment_bytes, expandable, address_space_bytes, large_up=False, cancel=None)\n-> (index, allocated, reserved, "
"requested, peak_allocated, peak_reserved, peak_requested, num_segments, peak_segments, num_allocations,\n"
"num_alloc_retries, num_ooms, num_device_alloc, num_device_free)\n\n"
"CachingAllocatorModel(limit, on_oom='raise').run(ops) for the default allocator setting, or with\n"
"expandable_segments (an expandable segment spanning address_space_bytes): index is that of the request\n"
"that ran out of memory under limit (None: no limit), -1 when every operation ran. large_up: new large\n"
"segments at increasing addresses (CachingAllocatorModel(large_addresses='up')). ops: a list of operation\n"
"tuples, or an object whose buffer holds four int64 per operation (kind, handle, bytes, -): the estimator's\n"
"compiled Stream (estimator/_events.c), replayed without the GIL. cancel: a bytearray whose first byte,\n"
"once set (by another thread), stops that replay: None is returned.");

static PyObject *replay(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ops, *limit_obj, *cancel_obj = Py_None;
    long long large_segment, address_space;
    int expandable, large_up = 0;
    if (!PyArg_ParseTuple(args, "OOLpL|pO", &ops, &limit_obj, &large_segment, &expandable, &address_space,
                          &large_up, &cancel_obj))
        return NULL;
    Py_buffer view, cancel_view;
    int flat = !PyList_Check(ops), cancelled = 0;
    volatile const char *cancel = NULL;
    if (cancel_obj != Py_None) {
        if (!flat) {
            PyErr_SetString(PyExc_TypeError, "cancel is for a buffer of operations only");
            return NULL;
        }
        if (PyObject_GetBuffer(cancel_obj, &cancel_view, PyBUF_SIMPLE) < 0) return NULL;
        if (cancel_view.len < 1) {
            PyBuffer_Release(&cancel_view);
            PyErr_SetString(PyExc_ValueError, "cancel must be a buffer of at least one byte (a bytearray)");
            return NULL;
        }
        cancel = cancel_view.buf;
    }
    if (flat) {
        /* the estimator's compiled stream (estimator/_events.c): four int64 per operation */
        if (PyObject_GetBuffer(ops, &view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
            if (cancel) PyBuffer_Release(&cancel_view);
            return NULL;
        }
        if (view.itemsize != 8 || !view.format || (strcmp(view.format, "q") && strcmp(view.format, "l")) ||
            view.len % 32) {
            PyBuffer_Release(&view);
            if (cancel) PyBuffer_Release(&cancel_view);
            PyErr_SetString(PyExc_TypeError, "ops must be a list of operation tuples or a buffer of int64 quads");
            return NULL;
        }
    }
    if (large_segment <= MIN_LARGE_ALLOC || address_space <= 0) {
        if (flat) PyBuffer_Release(&view);
        if (cancel) PyBuffer_Release(&cancel_view);
        PyErr_SetString(PyExc_ValueError, "large_segment_bytes must be over 10 MiB and address_space_bytes > 0");
        return NULL;
    }
    int64_t limit = INT64_MAX;
    if (limit_obj != Py_None) {
        limit = PyLong_AsLongLong(limit_obj);
        if (limit == -1 && PyErr_Occurred()) {
            if (flat) PyBuffer_Release(&view);
            if (cancel) PyBuffer_Release(&cancel_view);
            return NULL;
        }
    }
    State s;
    state_init(&s, large_up, expandable, address_space);
    Py_ssize_t n = flat ? view.len / 32 : PyList_GET_SIZE(ops), idx, failed = -1;
    if (flat) {
        /* no Python object is touched until the loop ends (errors: SETERR), so other threads run meanwhile:
           the planner replays the other order of segment addresses beside this one */
        int r;
        Py_BEGIN_ALLOW_THREADS
        r = run_flat(&s, view.buf, n, limit, large_segment, cancel, &failed);
        Py_END_ALLOW_THREADS
        int bad = r < 0;
        cancelled = r == 1;
        if (bad) goto error;
        goto done;
    }
    for (idx = 0; idx < n; idx++) {
        PyObject *op = PyList_GET_ITEM(ops, idx);
        if (!PyTuple_Check(op) || PyTuple_GET_SIZE(op) < 1) {
            PyErr_SetString(PyExc_TypeError, "an operation must be a tuple (kind, ...)");
            goto error;
        }
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(op, 0));
        if (kind == 0) {
            if (PyTuple_GET_SIZE(op) < 3) {
                PyErr_SetString(PyExc_TypeError, "a malloc is (0, handle, bytes, ...)");
                goto error;
            }
            int64_t h = item_int(op, 1), nbytes = item_int(op, 2);
            if (PyErr_Occurred()) goto error;
            int r = do_malloc(&s, h, nbytes, limit, large_segment);
            if (r < 0) goto error;
            if (r == 1) {
                failed = idx;
                break;
            }
        } else if (kind == 1) {
            if (PyTuple_GET_SIZE(op) < 2) {
                PyErr_SetString(PyExc_TypeError, "a free is (1, handle)");
                goto error;
            }
            int64_t h = item_int(op, 1);
            if (PyErr_Occurred()) goto error;
            if (do_free(&s, h) < 0) goto error;
        } else if (kind == -1 && PyErr_Occurred()) {
            goto error;
        }
    }
done:
    if (flat) PyBuffer_Release(&view);
    if (cancel) PyBuffer_Release(&cancel_view);
    if (cancelled) {
        free_state(&s);
        Py_RETURN_NONE;
    }
    PyObject *res = result_of(&s, failed);
    free_state(&s);
    return res;
error:
    if (flat) PyBuffer_Release(&view);
    if (cancel) PyBuffer_Release(&cancel_view);
    free_state(&s);
    return NULL;
}

/* ------------------------------------------------------------------ both orders of large segments' addresses */
typedef struct {
    State s;
    const int64_t *q;
    Py_ssize_t n, failed;
    int64_t limit, large_segment;
    volatile const char *cancel;
    int r;
} Order;

static void *order_run(void *arg) {
    Order *o = arg;
    o->r = run_flat(&o->s, o->q, o->n, o->limit, o->large_segment, o->cancel, &o->failed);
    return NULL;
}

#ifndef _WIN32
/* The second order's thread, made once and kept: a thread made per pair starts with cold memory (its malloc
   arena and stack fault their pages in again, a hundred page faults a pair), which cost as much as the pair
   saved. One caller at a time hands it an Order (`wk_busy`); another caller meanwhile replays both orders
   itself. After a fork the child has no worker: its state is reset (pthread_atfork) and one is made again
   when asked. */
static pthread_mutex_t wk_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wk_post = PTHREAD_COND_INITIALIZER, wk_done = PTHREAD_COND_INITIALIZER;
static Order *wk_job;   /* the Order handed over, not yet finished (NULL: none) */
static int wk_started;  /* the worker is running */
static int wk_busy;     /* a caller owns the worker until it has collected its Order */
static int wk_finished; /* the Order handed over is done */

static void *worker_main(void *arg) {
    (void)arg;
    pthread_mutex_lock(&wk_mu);
    for (;;) {
        while (!wk_job) pthread_cond_wait(&wk_post, &wk_mu);
        Order *o = wk_job;
        pthread_mutex_unlock(&wk_mu);
        order_run(o);
        pthread_mutex_lock(&wk_mu);
        wk_job = NULL;
        wk_finished = 1;
        pthread_cond_signal(&wk_done);
    }
    return NULL;
}

static void worker_after_fork(void) {
    pthread_mutex_init(&wk_mu, NULL);
    pthread_cond_init(&wk_post, NULL);
    pthread_cond_init(&wk_done, NULL);
    wk_job = NULL;
    wk_started = wk_busy = wk_finished = 0;
}

/* hand `o` to the worker: 1, or 0 where it cannot be had now (busy with another caller's, or not made) */
static int worker_post(Order *o) {
    pthread_mutex_lock(&wk_mu);
    if (wk_busy) {
        pthread_mutex_unlock(&wk_mu);
        return 0;
    }
    if (!wk_started) {
        pthread_t th;
        pthread_attr_t at;
        int ok = pthread_attr_init(&at) == 0;
        if (ok) {
            pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
            ok = pthread_create(&th, &at, worker_main, NULL) == 0;
            pthread_attr_destroy(&at);
        }
        if (!ok) {
            pthread_mutex_unlock(&wk_mu);
            return 0;
        }
        wk_started = 1;
    }
    wk_busy = 1;
    wk_finished = 0;
    wk_job = o;
    pthread_cond_signal(&wk_post);
    pthread_mutex_unlock(&wk_mu);
    return 1;
}

/* wait for the Order handed over to finish, and give the worker back */
static void worker_wait(void) {
    pthread_mutex_lock(&wk_mu);
    while (!wk_finished) pthread_cond_wait(&wk_done, &wk_mu);
    wk_busy = 0;
    pthread_mutex_unlock(&wk_mu);
}
#endif

PyDoc_STRVAR(replay_pair_doc,
"replay_pair(ops, limit, large_segment_bytes, address_space_bytes) -> (down, up)\n\n"
"replay(ops, limit, large_segment_bytes, False, address_space_bytes) with new large segments at decreasing\n"
"addresses (down) and at increasing ones (up), the second on a thread of its own beside the first: each a\n"
"result tuple as replay returns it. up is None when down ran out of memory before up was done (it is then\n"
"stopped: a verdict that needs both orders is decided by the first). ops: the estimator's compiled Stream (a\n"
"buffer of int64 quads); the default allocator setting only.");

static PyObject *replay_pair(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ops, *limit_obj;
    long long large_segment, address_space;
    if (!PyArg_ParseTuple(args, "OOLL", &ops, &limit_obj, &large_segment, &address_space)) return NULL;
    if (large_segment <= MIN_LARGE_ALLOC || address_space <= 0) {
        PyErr_SetString(PyExc_ValueError, "large_segment_bytes must be over 10 MiB and address_space_bytes > 0");
        return NULL;
    }
    int64_t limit = INT64_MAX;
    if (limit_obj != Py_None) {
        limit = PyLong_AsLongLong(limit_obj);
        if (limit == -1 && PyErr_Occurred()) return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(ops, &view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (view.itemsize != 8 || !view.format || (strcmp(view.format, "q") && strcmp(view.format, "l")) ||
        view.len % 32) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_TypeError, "replay_pair: ops must be a buffer of int64 quads");
        return NULL;
    }
    Py_ssize_t n = view.len / 32, failed = -1;
    /* the two states apart, each on cache lines of its own: both are written at every operation */
    Order *pair = PyMem_RawCalloc(3, sizeof(Order));
    volatile char *stop = PyMem_RawCalloc(1, 128);
    if (!pair || !stop) {
        PyMem_RawFree(pair);
        PyMem_RawFree((void *)stop);
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    State *down = &pair[0].s;
    Order *up = &pair[2];
    state_init(down, 0, 0, address_space);
    state_init(&up->s, 1, 0, address_space);
    up->q = view.buf;
    up->n = n;
    up->limit = limit;
    up->large_segment = large_segment;
    up->cancel = stop;
    up->failed = -1;
    up->r = 1;
    int rd;
    Py_BEGIN_ALLOW_THREADS
#ifndef _WIN32
    int threaded = worker_post(up);
#else
    int threaded = 0; /* no second thread: the orders one after the other */
#endif
    rd = run_flat(down, view.buf, n, limit, large_segment, NULL, &failed);
    if (rd != 0 || failed >= 0) *stop = 1; /* down ran out of memory (or failed): up is not needed */
    if (threaded) {
#ifndef _WIN32
        worker_wait();
#endif
        if (up->r < 0) { /* its error was set on that thread's own state: made again here, where it is raised */
            free_state(&up->s);
            state_init(&up->s, 1, 0, address_space);
            up->cancel = NULL;
            order_run(up);
        }
    } else if (!*stop) {
        up->cancel = NULL;
        order_run(up);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    PyObject *res = NULL;
    if (rd >= 0 && up->r >= 0) {
        PyObject *a = result_of(down, failed);
        PyObject *b = up->r == 1 ? (Py_INCREF(Py_None), Py_None) : result_of(&up->s, up->failed);
        if (a && b) res = PyTuple_Pack(2, a, b);
        Py_XDECREF(a);
        Py_XDECREF(b);
    }
    free_state(down);
    free_state(&up->s);
    PyMem_RawFree(pair);
    PyMem_RawFree((void *)stop);
    return res;
}

static PyMethodDef methods[] = {
    {"replay", replay, METH_VARARGS, replay_doc},
    {"replay_pair", replay_pair, METH_VARARGS, replay_pair_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "memfit.allocator._replay",
    "The allocator model's replay, compiled, for the default setting and expandable segments (see _replay.c).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__replay(void) {
#ifndef _WIN32
    static int at_fork;
    if (!at_fork && pthread_atfork(NULL, NULL, worker_after_fork) == 0) at_fork = 1;
#endif
    return PyModule_Create(&module);
}

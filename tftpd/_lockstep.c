/* The hot loop of a lock-step TFTP download (RFC 1350 section 2), in C.
 *
 * tftpd/lockstep.py owns the transfer; its `_fast` path, a chain of "the expected ACK came:
 * send the next DATA block", is the one place where Python's per-block cost decides the speed
 * (see the note in lockstep.py and bench/RESULTS.md "Lock-step TFTP"). This module runs that
 * same chain with the GIL released: recvfrom, compare with the ACK we expect from the client's
 * TID, sendto the block prepared meanwhile, prepare the next (pread into a read-ahead buffer).
 * Everything else (a stranger, a duplicate ACK, an ERROR, a timeout, the end, a counter
 * hand-over every `budget` blocks) returns to Python, which stays the one authority on the
 * protocol: this loop decides nothing that lockstep.py's pure-Python `_fast` does not.
 *
 * run(sock_fd, client, file_fd, content, blksize, cur, last, budget)
 *   sock_fd   the transfer's socket, blocking, with SO_RCVTIMEO set by the caller
 *   client    the client's TID as the socket module spells it: (host, port) or
 *             (host, port, flowinfo, scope_id)
 *   file_fd   the file to pread blocks from, or -1 to slice `content` instead
 *   content   a bytes-like object holding the whole payload when file_fd is -1, else None
 *   blksize   the negotiated block size (8..65464, RFC 2348)
 *   cur       the absolute number of the block in flight, whose ACK we wait for
 *   last      the absolute number of the last block
 *   budget    at most this many blocks are sent before returning (counter hand-over)
 * returns (cur, send_errno, sent_bytes, when, why, got)
 *   cur         the block in flight now (cur + blocks sent)
 *   send_errno  0, or the errno of a sendto that failed for block cur + 1 (not sent)
 *   sent_bytes  payload bytes sent
 *   when        CLOCK_MONOTONIC seconds of the last send (0.0 if none), time.monotonic's clock
 *   why         0 budget spent, 1 last block sent, 2 nothing came within the receive timeout
 *               (or a signal), 3 a datagram other than the expected ACK: `got`, 4 sendto failed
 *   got         (data, source) when why is 3, else None; source is `client` itself when the
 *               datagram came from the client's TID, None when there was no source (the
 *               socket's receive side was shut down: a stop)
 * OSError when pread or recvfrom fails otherwise (the caller fails the transfer).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define READ_AHEAD (64 * 1024)    /* bytes per pread: 44 blocks of 1468, a bounded cost per worker */
#define RECV_BYTES 2048           /* as lockstep.RECV_BYTES */
#define MAX_BLKSIZE 65464         /* RFC 2348 */

enum { WHY_BUDGET = 0, WHY_SENT_ALL = 1, WHY_TIMEOUT = 2, WHY_OTHER = 3, WHY_SEND_FAILED = 4 };

typedef struct {
    struct sockaddr_storage addr;
    socklen_t len;
} Peer;

/* The client's tuple as a sockaddr, so every datagram's source is compared in binary. */
static int peer_from_tuple(PyObject *client, Peer *peer) {
    const char *host;
    int port;
    unsigned int flowinfo = 0, scope_id = 0;
    memset(peer, 0, sizeof *peer);
    if (!PyTuple_Check(client) || PyTuple_GET_SIZE(client) < 2) {
        PyErr_SetString(PyExc_TypeError, "client: a (host, port) tuple");
        return -1;
    }
    if (!PyArg_ParseTuple(client, "si|II", &host, &port, &flowinfo, &scope_id))
        return -1;
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "client: port out of range");
        return -1;
    }
    struct sockaddr_in *v4 = (struct sockaddr_in *)&peer->addr;
    if (PyTuple_GET_SIZE(client) == 2 && inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        peer->len = sizeof *v4;
        return 0;
    }
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&peer->addr;
    char text[INET6_ADDRSTRLEN + IF_NAMESIZE + 2];
    snprintf(text, sizeof text, "%s", host);
    char *percent = strchr(text, '%');          /* fe80::1%eth0: the scope is scope_id */
    if (percent)
        *percent = '\0';
    if (inet_pton(AF_INET6, text, &v6->sin6_addr) != 1) {
        PyErr_Format(PyExc_ValueError, "client: %s is not an IP address", host);
        return -1;
    }
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons((uint16_t)port);
    v6->sin6_flowinfo = htonl(flowinfo);
    v6->sin6_scope_id = scope_id;
    peer->len = sizeof *v6;
    return 0;
}

static int same_peer(const Peer *a, const struct sockaddr_storage *b) {
    if (a->addr.ss_family != b->ss_family)
        return 0;
    if (b->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)&a->addr, *y = (const void *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    if (b->ss_family == AF_INET6) {
        const struct sockaddr_in6 *x = (const void *)&a->addr, *y = (const void *)b;
        return x->sin6_port == y->sin6_port && x->sin6_scope_id == y->sin6_scope_id &&
               memcmp(&x->sin6_addr, &y->sin6_addr, sizeof x->sin6_addr) == 0;
    }
    return 0;
}

/* A stranger's address as the socket module would give it (for our ERROR 5 and the log). */
static PyObject *tuple_from_sockaddr(const struct sockaddr_storage *addr) {
    char host[INET6_ADDRSTRLEN + IF_NAMESIZE + 2];
    if (addr->ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const void *)addr;
        inet_ntop(AF_INET, &v4->sin_addr, host, sizeof host);
        return Py_BuildValue("(si)", host, ntohs(v4->sin_port));
    }
    if (addr->ss_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const void *)addr;
        inet_ntop(AF_INET6, &v6->sin6_addr, host, INET6_ADDRSTRLEN);
        char name[IF_NAMESIZE];
        if (v6->sin6_scope_id && if_indextoname(v6->sin6_scope_id, name)) {
            size_t used = strlen(host);
            snprintf(host + used, sizeof host - used, "%%%s", name);
        }
        return Py_BuildValue("(siII)", host, ntohs(v6->sin6_port),
                             (unsigned int)ntohl(v6->sin6_flowinfo),
                             (unsigned int)v6->sin6_scope_id);
    }
    Py_RETURN_NONE;
}

static double monotonic_s(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec / 1e9;
}

typedef struct {              /* where block payloads come from */
    int fd;                   /* pread from here, or -1: slice `memory` */
    const uint8_t *memory;
    Py_ssize_t memory_len;
    uint8_t *chunk;           /* read-ahead buffer (file) */
    Py_ssize_t chunk_size;    /* its size: READ_AHEAD, or less for a small file */
    long long first;          /* the block at chunk[0] */
    Py_ssize_t chunk_len;
    int blksize;
} Blocks;

/* Copies block `n`'s payload into out (blksize bytes at most); its length, or -1 (errno). */
static Py_ssize_t block_payload(Blocks *b, long long n, uint8_t *out) {
    long long offset = (n - 1) * (long long)b->blksize;
    if (b->fd < 0) {
        Py_ssize_t len = 0;
        if (offset < b->memory_len) {
            len = b->memory_len - (Py_ssize_t)offset;
            if (len > b->blksize)
                len = b->blksize;
            memcpy(out, b->memory + offset, (size_t)len);
        }
        return len;
    }
    long long start = (n - b->first) * (long long)b->blksize;
    if (b->first <= 0 || n < b->first || start + b->blksize > b->chunk_len) {
        Py_ssize_t want = (b->chunk_size / b->blksize > 0 ? b->chunk_size / b->blksize : 1) *
                          (Py_ssize_t)b->blksize;
        ssize_t got;
        do {
            got = pread(b->fd, b->chunk, (size_t)want, (off_t)offset);
        } while (got < 0 && errno == EINTR);
        if (got < 0)
            return -1;
        b->first = n;
        b->chunk_len = got;
        start = 0;
    }
    Py_ssize_t len = b->chunk_len - (Py_ssize_t)start;
    if (len <= 0)
        return 0;
    if (len > b->blksize)
        len = b->blksize;
    memcpy(out, b->chunk + start, (size_t)len);
    return len;
}

static PyObject *lockstep_run(PyObject *self, PyObject *args) {
    (void)self;
    int sock, file_fd, blksize;
    PyObject *client, *content;
    long long cur, last, budget;
    if (!PyArg_ParseTuple(args, "iOiOiLLL", &sock, &client, &file_fd, &content, &blksize,
                          &cur, &last, &budget))
        return NULL;
    if (blksize < 8 || blksize > MAX_BLKSIZE || cur < 0 || last < cur + 1 || budget < 1) {
        PyErr_SetString(PyExc_ValueError, "run: blksize, cur, last or budget out of range");
        return NULL;
    }
    Peer peer;
    if (peer_from_tuple(client, &peer) < 0)
        return NULL;

    Py_buffer view = {0};
    Blocks blocks = {.fd = file_fd, .blksize = blksize};
    if (file_fd < 0) {
        if (PyObject_GetBuffer(content, &view, PyBUF_SIMPLE) < 0)
            return NULL;
        blocks.memory = view.buf;
        blocks.memory_len = view.len;
    } else {
        /* No more than the blocks left to send: a small boot program costs its own size. */
        long long left = (last - cur) * (long long)blksize;
        Py_ssize_t room = (Py_ssize_t)(left < READ_AHEAD ? left : READ_AHEAD);
        if (room < blksize)
            room = blksize;
        blocks.chunk = PyMem_RawMalloc((size_t)room);
        blocks.chunk_size = room;
        if (!blocks.chunk)
            return PyErr_NoMemory();
    }
    uint8_t *packet = PyMem_RawMalloc((size_t)blksize + 4);
    if (!packet) {
        PyMem_RawFree(blocks.chunk);
        if (view.obj)
            PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }

    uint8_t received[RECV_BYTES];
    struct sockaddr_storage source;
    socklen_t source_len = 0;
    ssize_t received_len = 0;
    long long sent_bytes = 0, start = cur;
    double when = 0.0;
    int why = WHY_BUDGET, send_errno = 0, io_errno = 0;
    Py_ssize_t payload;

    Py_BEGIN_ALLOW_THREADS
    /* Block cur + 1, ready before its ACK comes: first the next block, then the rest. */
    payload = block_payload(&blocks, cur + 1, packet + 4);
    if (payload < 0)
        io_errno = errno;
    while (!io_errno) {
        source_len = sizeof source;
        received_len = recvfrom(sock, received, sizeof received, 0,
                                (struct sockaddr *)&source, &source_len);
        if (received_len < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                why = WHY_TIMEOUT;
            else
                io_errno = errno;
            break;
        }
        if (received_len != 4 || received[0] != 0 || received[1] != 4 ||
            received[2] != (uint8_t)((cur >> 8) & 0xFF) || received[3] != (uint8_t)(cur & 0xFF) ||
            !same_peer(&peer, &source)) {
            why = WHY_OTHER;
            break;
        }
        long long n = cur + 1;
        packet[0] = 0;
        packet[1] = 3;
        packet[2] = (uint8_t)((n >> 8) & 0xFF);
        packet[3] = (uint8_t)(n & 0xFF);
        if (sendto(sock, packet, (size_t)payload + 4, 0, (struct sockaddr *)&peer.addr,
                   peer.len) < 0) {
            send_errno = errno;
            when = monotonic_s();
            why = WHY_SEND_FAILED;
            break;
        }
        when = monotonic_s();
        cur = n;
        sent_bytes += payload;
        if (cur >= last) {
            why = WHY_SENT_ALL;
            break;
        }
        payload = block_payload(&blocks, cur + 1, packet + 4);
        if (payload < 0) {
            io_errno = errno;
            break;
        }
        if (cur - start >= budget) {
            why = WHY_BUDGET;
            break;
        }
    }
    Py_END_ALLOW_THREADS

    PyMem_RawFree(packet);
    PyMem_RawFree(blocks.chunk);
    if (view.obj)
        PyBuffer_Release(&view);
    if (io_errno) {
        errno = io_errno;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *got;
    if (why == WHY_OTHER) {
        PyObject *who;
        if (source_len == 0) {           /* no source: woken by the caller's shutdown(SHUT_RD) */
            who = Py_None;
            Py_INCREF(who);
        } else if (same_peer(&peer, &source)) {
            who = client;
            Py_INCREF(who);
        } else {
            who = tuple_from_sockaddr(&source);
            if (!who)
                return NULL;
        }
        got = Py_BuildValue("(y#N)", (const char *)received, (Py_ssize_t)received_len, who);
        if (!got)
            return NULL;
    } else {
        got = Py_None;
        Py_INCREF(got);
    }
    return Py_BuildValue("(LiLdiN)", cur, send_errno, sent_bytes, when, why, got);
}

static PyMethodDef methods[] = {
    {"run", lockstep_run, METH_VARARGS,
     "run(sock_fd, client, file_fd, content, blksize, cur, last, budget) -> "
     "(cur, send_errno, sent_bytes, when, why, got): the lock-step hot loop (see the source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "tftpd._lockstep",
    "The hot loop of a lock-step TFTP download in C (tftpd/lockstep.py is the authority).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__lockstep(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "WHY_BUDGET", WHY_BUDGET) < 0 ||
        PyModule_AddIntConstant(m, "WHY_SENT_ALL", WHY_SENT_ALL) < 0 ||
        PyModule_AddIntConstant(m, "WHY_TIMEOUT", WHY_TIMEOUT) < 0 ||
        PyModule_AddIntConstant(m, "WHY_OTHER", WHY_OTHER) < 0 ||
        PyModule_AddIntConstant(m, "WHY_SEND_FAILED", WHY_SEND_FAILED) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

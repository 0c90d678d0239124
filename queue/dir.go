package queue

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"hash/fnv"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/batonmail/baton/internal/iheap"
)

// ErrLocked is returned by OpenDir when another Dir (in this or another
// process) has the directory open.
var ErrLocked = errors.New("queue: directory is in use by another process")

// DirConfig configures a Dir queue.
type DirConfig struct {
	// Path is the queue directory; it is created if missing.
	Path string
	// Schedule decides retry times and the maximum age.
	Schedule Schedule
	// Now returns the current time; nil means time.Now. Tests inject a
	// clock here.
	Now func() time.Time
	// Logger receives recovery, quarantine and I/O error reports; nil
	// discards them.
	Logger *slog.Logger
	// NoSync skips every fsync. It is UNSAFE: a crash or power loss can
	// lose acknowledged mail. Use it only in tests.
	NoSync bool
	// FileSync makes each writer fsync its own file (the group then
	// shares one directory sync) instead of one syncfs(2) per group.
	// syncfs is the default on Linux and the fastest on a file system
	// the queue has to itself; on one shared with heavy writers, whose
	// dirty data every syncfs would flush too, FileSync can be faster.
	// Elsewhere FileSync is always used.
	FileSync bool
	// NoJournal writes every message to a file of its own at Enqueue,
	// as Dir did before it had a journal (see dirjournal.go). The
	// journal is faster; NoJournal is for comparison and for tests of
	// the file layer. A journal that an earlier run left in the
	// directory is still read and kept: its messages are served from
	// it, and finished messages are recorded in it.
	NoJournal bool
	// JournalSegmentSize is the size of one journal segment file; 0
	// means 16 MiB (at least 64 KiB). A message's record must fit in a
	// quarter of a segment, or the message is written to a file.
	JournalSegmentSize int64
	// JournalSegments is how many segments the journal may grow to
	// before the messages still in the oldest are copied into files so
	// that it can be reused; 0 means 8.
	JournalSegments int
}

// Dir is the file-backed Queue that relayd uses, durable when Enqueue
// returns, with group commit so that many concurrent submissions share one
// sync. New messages are appended to a journal of segment files; a
// message whose state changes (a deferral, a hold) moves to a file of its
// own in the directory. See the package documentation for the layout and
// the recovery rules, and dirjournal.go for the journal.
//
// In memory Dir keeps only a compact index (ID, stream, received and next
// due times, a few flags and the pending-recipient count per domain);
// envelopes, recipient states and bodies are read from disk when a
// message is leased or inspected. Each stream has a due heap of its own,
// so LeaseStream costs O(log n) however large other streams' backlogs are.
// One directory is used by one Dir at a time: OpenDir locks it.
type Dir struct {
	cfg   DirConfig
	log   *slog.Logger
	mode  syncMode
	path  string
	tmp   string // half-written messages
	msgs  string // committed messages
	quar  string // quarantined files
	lockF *os.File
	// msgDir and tmpDir are the open msg and tmp directories, for fsync
	// and syncfs.
	msgDir, tmpDir *os.File

	// stripes serialise file updates per message (Settle and Admin
	// operations on the same ID); taken before mu.
	stripes [64]sync.Mutex

	mu     sync.Mutex
	closed bool
	idx    map[ID]*dirEntry
	// streams holds one due heap per stream (by Envelope.StreamName), so
	// that LeaseStream finds the stream's earliest message without
	// looking at other streams' messages; tops orders the streams with
	// a non-empty heap by their earliest entry, for Lease over all
	// streams.
	streams map[string]*dirStream
	tops    iheap.Heap[*dirStream]
	domains map[string]int // pending recipients per domain
	wake    chan struct{}  // closed and replaced when something may be due
	nquar   int            // files quarantined since open
	nfresh  int            // entries with a fresh message (see dirEntry)
	readers map[ID]int     // open body readers per message (see recycle)

	// free holds files of finished messages, renamed to tmp/free.N, for
	// Enqueue to write the next messages into (see recycle); freeSeq
	// numbers them.
	freeMu  sync.Mutex
	free    []string
	freeSeq uint64

	commitMu     sync.RWMutex // guards commitClosed and sends on commitCh
	commitClosed bool
	commitCh     chan *commitReq
	commitDone   chan struct{}
	syncCounter

	// jrn is the journal new messages are written to (dirjournal.go).
	jrn journal
	// settling counts Settle and Delete calls past their closed check,
	// which Close waits for: a finished message's DONE record must reach
	// the committer before it stops.
	settling sync.WaitGroup

	// faults, when set (by tests in this package), is called before each
	// write and sync and may return an error to inject, such as ENOSPC.
	faults func(op string) error
}

// dirEntry is the in-memory index record of one message.
type dirEntry struct {
	id ID
	// next is when the entry next needs attention, in Unix nanoseconds:
	// the earliest NextAttempt of its pending recipients, or the end of
	// its lease while leased.
	next int64
	// received is the message's Received time in Unix nanoseconds, for
	// Stats.Oldest.
	received int64
	hi       int        // index in stream.due, -1 when not in it
	stream   *dirStream // the message's stream; never changes
	held     bool
	tried    bool
	lease    *dirLease
	// fresh is the message as Enqueue wrote it, kept until its first
	// lease so that Lease need not open and parse the file it has just
	// written (at most maxFresh entries have one; held mail never).
	// Lease takes it; any other change to the file (update) or the
	// entry's removal drops it.
	fresh *diskMessage
	// jrn is where the message's ENQ record is while the message is
	// journaled: the record is its only copy, with no file in msg/; nil
	// otherwise (never journaled, or copied out, see copyOut). It changes
	// only under the message's stripe lock and mu.
	jrn *jrnLoc
}

// dirStream is the part of the index for one stream.
type dirStream struct {
	name string
	due  iheap.Heap[*dirEntry]
	n    int // entries of this stream in the index
	ti   int // index in Dir.tops, -1 when due is empty
}

// maxFresh bounds the messages kept in memory between Enqueue and their
// first lease: a few hundred bytes each, so a backlog costs at most a
// few MB for them, and the rest are read from disk as before.
const maxFresh = 4096

// dropFresh forgets e's fresh message. Callers hold mu.
func (q *Dir) dropFresh(e *dirEntry) {
	if e.fresh != nil {
		e.fresh = nil
		q.nfresh--
	}
}

type dirLease struct {
	token string
	until time.Time
	// dm is the message as read at lease time, so Settle need not read
	// the file again; any change through update (hold, release, retry)
	// drops it.
	dm *diskMessage
}

var (
	_ Queue        = (*Dir)(nil)
	_ StreamLeaser = (*Dir)(nil)
)

// OpenDir opens (creating it if needed) the queue directory cfg.Path and
// recovers it: half-written messages of a crashed process are discarded
// (they were never acknowledged), damaged files are quarantined, leases of
// the previous process are gone, and every stored message is due again at
// its recorded next attempt. It returns ErrLocked if another Dir holds the
// directory.
func OpenDir(cfg DirConfig) (*Dir, error) {
	return openDir(cfg, 0)
}

func openDir(cfg DirConfig, mode syncMode) (*Dir, error) {
	if cfg.Path == "" {
		return nil, errors.New("queue: DirConfig.Path is empty")
	}
	cfg.Schedule = cfg.Schedule.WithDefaults()
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	q := &Dir{
		cfg:        cfg,
		log:        cfg.Logger,
		path:       cfg.Path,
		tmp:        filepath.Join(cfg.Path, "tmp"),
		msgs:       filepath.Join(cfg.Path, "msg"),
		quar:       filepath.Join(cfg.Path, "quarantine"),
		idx:        make(map[ID]*dirEntry),
		streams:    make(map[string]*dirStream),
		readers:    make(map[ID]int),
		domains:    make(map[string]int),
		wake:       make(chan struct{}),
		commitCh:   make(chan *commitReq, 1024),
		commitDone: make(chan struct{}),
	}
	if q.log == nil {
		q.log = slog.New(slog.DiscardHandler)
	}
	q.mode = defaultSyncMode
	if mode != 0 {
		q.mode = mode
	}
	if cfg.FileSync {
		q.mode = syncFile
	}
	if cfg.NoSync {
		q.mode = syncNone
	}
	for _, d := range []string{q.path, q.tmp, q.msgs, q.quar} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("queue: %w", err)
		}
	}
	lf, err := os.OpenFile(filepath.Join(q.path, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("queue: %w", err)
	}
	if err := lockDir(lf); err != nil {
		lf.Close()
		if errors.Is(err, ErrLocked) {
			return nil, fmt.Errorf("%w: %s", ErrLocked, q.path)
		}
		return nil, fmt.Errorf("queue: lock %s: %w", q.path, err)
	}
	q.lockF = lf
	if q.msgDir, err = os.Open(q.msgs); err != nil {
		lf.Close()
		return nil, fmt.Errorf("queue: %w", err)
	}
	if q.tmpDir, err = os.Open(q.tmp); err != nil {
		q.msgDir.Close()
		lf.Close()
		return nil, fmt.Errorf("queue: %w", err)
	}
	// The journal is read first: its DONE records say which message
	// files are finished although their removal was lost in a crash.
	var live map[ID]*jrnLoc
	var done map[ID]bool
	// With NoJournal, an existing journal still holds acknowledged
	// messages: it is read, and kept, but not written to by Enqueue.
	useJournal := !cfg.NoJournal
	if _, serr := os.Stat(filepath.Join(q.path, "wal")); serr == nil {
		useJournal = true
	}
	if useJournal {
		live, done, err = q.scanJournal()
	}
	var inMsg map[ID]bool
	if err == nil {
		inMsg, err = q.recover(done)
	}
	if err == nil && useJournal {
		q.addJournaled(live, inMsg)
	}
	if err != nil {
		q.closeSegments()
		q.msgDir.Close()
		q.tmpDir.Close()
		lf.Close()
		return nil, err
	}
	go q.committer()
	if useJournal {
		q.startKeeper()
	}
	return q, nil
}

// recover rebuilds the index from the directory, removing the files of
// the messages in done (finished, by the journal). It returns the names
// in msg/, which the journal's ENQ records defer to.
func (q *Dir) recover(done map[ID]bool) (map[ID]bool, error) {
	// tmp/ holds messages that were being written, and messages that
	// were synced (and perhaps acknowledged) but whose rename into msg/
	// was lost. Complete files with a valid body checksum are moved into
	// msg/; anything else was never acknowledged and is discarded.
	tmps, err := os.ReadDir(q.tmp)
	if err != nil {
		return nil, fmt.Errorf("queue: %w", err)
	}
	promoted, discarded := 0, 0
	for _, e := range tmps {
		p := filepath.Join(q.tmp, e.Name())
		if validID(ID(e.Name())) && !done[ID(e.Name())] && checkComplete(p, ID(e.Name())) == nil {
			if err := os.Rename(p, q.file(ID(e.Name()))); err == nil {
				promoted++
				continue
			}
		}
		os.Remove(p)
		discarded++
	}
	if promoted > 0 {
		if err := q.syncDirs(); err != nil {
			return nil, fmt.Errorf("queue: sync: %w", err)
		}
	}
	if len(tmps) > 0 {
		q.log.Info("queue: recovered messages left in tmp", "complete", promoted, "discarded", discarded)
	}
	names, err := q.msgDir.Readdirnames(-1)
	if err != nil {
		return nil, fmt.Errorf("queue: %w", err)
	}
	inMsg := make(map[ID]bool, len(names))
	finished := 0
	for i, n := range names {
		if done[ID(n)] {
			os.Remove(q.file(ID(n)))
			names[i] = ""
			finished++
			continue
		}
		inMsg[ID(n)] = true
	}
	if finished > 0 {
		q.log.Info("queue: removed files of finished messages", "messages", finished)
		if err := q.fsync(q.msgDir); err != nil {
			return nil, fmt.Errorf("queue: sync: %w", err)
		}
	}
	type result struct {
		id  ID
		dm  *diskMessage
		err error
	}
	work := make(chan string)
	results := make(chan result)
	var wg sync.WaitGroup
	for range max(2, runtime.GOMAXPROCS(0)*2) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for name := range work {
				id := ID(name)
				dm, err := q.readFile(id, true)
				results <- result{id, dm, err}
			}
		}()
	}
	go func() {
		for _, n := range names {
			if n != "" {
				work <- n
			}
		}
		close(work)
		wg.Wait()
		close(results)
	}()
	now := q.cfg.Now()
	for r := range results {
		if r.err != nil {
			// Resource exhaustion says nothing about the file: fail the
			// open. Any other error (damage, a stray directory, EIO)
			// moves that one file aside and keeps the rest.
			if errors.Is(r.err, syscall.EMFILE) || errors.Is(r.err, syscall.ENFILE) || errors.Is(r.err, syscall.ENOMEM) {
				return nil, fmt.Errorf("queue: recover %s: %w", r.id, r.err)
			}
			if errors.Is(r.err, ErrNotFound) {
				continue
			}
			q.quarantine(r.id, r.err)
			continue
		}
		q.mu.Lock()
		q.add(r.id, r.dm.msg, r.dm.held)
		q.mu.Unlock()
	}
	q.log.Info("queue: opened", "path", q.path, "messages", len(q.idx), "quarantined", q.nquar, "now", now)
	return inMsg, nil
}

// checkComplete verifies a whole message file, body checksum included.
func checkComplete(path string, id ID) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	dm, err := readMessage(f, id)
	if err != nil {
		return err
	}
	br := &bodyReader{r: io.NewSectionReader(f, dm.hdr.bodyOff, dm.hdr.bodySize), crc: newCRC(), want: dm.hdr.bodyCRC, id: id}
	_, err = io.Copy(io.Discard, br)
	return err
}

// syncDirs makes renames durable.
func (q *Dir) syncDirs() error {
	if err := q.fsync(q.tmpDir); err != nil {
		return err
	}
	return q.fsync(q.msgDir)
}

func validID(id ID) bool {
	if id == "" || len(id) > 64 {
		return false
	}
	return !strings.ContainsAny(string(id), "/\\.\x00")
}

// file returns the path of a committed message.
func (q *Dir) file(id ID) string { return filepath.Join(q.msgs, string(id)) }

// readFile opens and reads a committed message. With repair, a torn last
// record is cut off.
func (q *Dir) readFile(id ID, repair bool) (*diskMessage, error) {
	if !validID(id) {
		return nil, corruptf("bad file name %q", id)
	}
	flag := os.O_RDONLY
	if repair {
		flag = os.O_RDWR
	}
	f, err := os.OpenFile(q.file(id), flag, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%w: %s", ErrNotFound, id)
		}
		return nil, err
	}
	defer f.Close()
	dm, err := readMessage(f, id)
	if err != nil {
		return nil, err
	}
	if repair && dm.end < dm.size {
		q.log.Warn("queue: cut torn state record", "id", id, "bytes", dm.size-dm.end)
		if err := f.Truncate(dm.end); err != nil {
			return nil, err
		}
		dm.size = dm.end
	}
	return dm, nil
}

// read reads e's message from its file, or from its journal record while
// it is journaled. Callers hold the message's stripe lock.
func (q *Dir) read(e *dirEntry) (*diskMessage, error) {
	if loc := q.jrnOf(e); loc != nil {
		return readJournaled(e.id, loc)
	}
	return q.readFile(e.id, false)
}

// jrnOf returns e.jrn, read under mu.
func (q *Dir) jrnOf(e *dirEntry) *jrnLoc {
	q.mu.Lock()
	defer q.mu.Unlock()
	return e.jrn
}

// quarantineEntry sets aside the damaged message of e, which is out of the
// index: its file, or a copy of its journal record. Callers hold the
// message's stripe lock, not mu.
func (q *Dir) quarantineEntry(e *dirEntry, cause error) {
	loc := q.jrnOf(e)
	if loc == nil {
		q.quarantine(e.id, cause)
	} else {
		q.quarantineBytes(e.id, loc.image(), cause)
	}
	q.unjournal(e.id, loc, true)
}

// quarantine moves a damaged file aside and reports it.
func (q *Dir) quarantine(id ID, cause error) {
	name := filepath.Base(string(id))
	dst := filepath.Join(q.quar, name)
	if _, err := os.Lstat(dst); err == nil {
		dst = fmt.Sprintf("%s.%d", dst, time.Now().UnixNano())
	}
	if err := os.Rename(filepath.Join(q.msgs, name), dst); err != nil && !errors.Is(err, os.ErrNotExist) {
		q.log.Error("queue: cannot quarantine damaged file", "id", id, "err", err, "cause", cause)
		return
	}
	now := time.Now()
	os.Chtimes(dst, now, now)
	q.mu.Lock()
	q.nquar++
	q.mu.Unlock()
	q.log.Error("queue: quarantined damaged message file", "id", id, "to", dst, "err", cause)
}

// add puts a message into the index. Callers hold mu.
func (q *Dir) add(id ID, m *Message, held bool) *dirEntry {
	name := m.Envelope.StreamName()
	s := q.streams[name]
	if s == nil {
		s = &dirStream{name: name, ti: -1}
		q.streams[name] = s
	}
	s.n++
	e := &dirEntry{id: id, hi: -1, held: held, stream: s, received: m.Received.UnixNano()}
	q.idx[id] = e
	q.refresh(e, m)
	q.countDomains(m, 1)
	return e
}

// refresh sets the entry's flags and heap position from m. Callers hold mu.
func (q *Dir) refresh(e *dirEntry, m *Message) {
	e.tried = false
	for _, r := range m.Recipients {
		if r.Attempts > 0 {
			e.tried = true
			break
		}
	}
	idle := false
	if e.lease != nil {
		e.next = e.lease.until.UnixNano()
	} else if t := m.NextAttempt(); !t.IsZero() {
		e.next = t.UnixNano()
	} else {
		idle = true // nothing pending: never due
	}
	q.place(e, !e.held && !idle)
}

// place puts e where it belongs in its stream's due heap (out of it
// unless in), and the stream where it belongs in tops. Callers hold mu.
func (q *Dir) place(e *dirEntry, in bool) {
	iheap.Place(&e.stream.due, e, e.hi, in)
	iheap.Place(&q.tops, e.stream, e.stream.ti, len(e.stream.due) > 0)
}

// reschedule restores the heap order after e.next changed. Callers hold
// mu.
func (q *Dir) reschedule(e *dirEntry) {
	if e.hi >= 0 {
		q.place(e, true)
	}
}

// unschedule takes e out of its due heap. Callers hold mu.
func (q *Dir) unschedule(e *dirEntry) {
	if e.hi >= 0 {
		q.place(e, false)
	}
}

// first returns the entry that is next due in stream, or across every
// stream when stream is "", or nil when none is scheduled. Callers hold
// mu.
func (q *Dir) first(stream string) *dirEntry {
	if stream == "" {
		if len(q.tops) == 0 {
			return nil
		}
		return q.tops[0].due[0]
	}
	if s := q.streams[stream]; s != nil && len(s.due) > 0 {
		return s.due[0]
	}
	return nil
}

func (q *Dir) countDomains(m *Message, delta int) {
	for _, r := range m.Recipients {
		if r.State != RcptPending {
			continue
		}
		d := r.Domain()
		q.domains[d] += delta
		if q.domains[d] <= 0 {
			delete(q.domains, d)
		}
	}
}

// remove takes an entry out of the index. Callers hold mu.
func (q *Dir) remove(e *dirEntry) {
	if q.idx[e.id] != e {
		return
	}
	q.dropFresh(e)
	q.unschedule(e)
	delete(q.idx, e.id)
	if e.stream.n--; e.stream.n == 0 {
		delete(q.streams, e.stream.name)
	}
}

// signal wakes Lease callers. Callers hold mu.
func (q *Dir) signal() {
	close(q.wake)
	q.wake = make(chan struct{})
}

func (q *Dir) stripe(id ID) *sync.Mutex {
	h := fnv.New32a()
	h.Write([]byte(id))
	return &q.stripes[h.Sum32()%uint32(len(q.stripes))]
}

// state returns the message state the index knows. Callers hold mu.
func (e *dirEntry) state(now time.Time) State {
	switch {
	case e.held:
		return StateHeld
	case e.lease != nil && e.lease.until.After(now):
		return StateLeased
	case e.tried:
		return StateDeferred
	}
	return StateQueued
}

// dirFile wraps a message file being written so that tests can inject
// write errors.
type dirFile struct {
	f *os.File
	q *Dir
}

func (w dirFile) Write(p []byte) (int, error) {
	if err := w.q.fault("write"); err != nil {
		return 0, err
	}
	return w.f.Write(p)
}

// countWriter counts and checksums what passes through it.
var (
	dirWriters  = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 64<<10) }}
	dirCopyBufs = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}
)

// onlyWriter hides any ReadFrom so io.CopyBuffer uses the pooled buffer.
type onlyWriter struct{ io.Writer }

type countWriter struct {
	w   io.Writer
	n   int64
	crc hash.Hash32
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	c.crc.Write(p[:n])
	return n, err
}

func (q *Dir) isClosed() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.closed
}

// Enqueue implements Queue. The body is streamed to a file in tmp/, the
// header written, and the file joins a group commit that syncs it and
// renames it into msg/; Enqueue returns once that group is durable. A
// cancelled ctx before the commit, or any error, leaves nothing behind.
func (q *Dir) Enqueue(ctx context.Context, env *Envelope, body io.Reader) (ID, error) {
	if err := env.Validate(); err != nil {
		return "", err
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	if q.isClosed() {
		return "", ErrClosed
	}
	id := NewID()
	// Without a monotonic reading the times in m are those read back
	// from the file (m may be kept as the entry's fresh message).
	now := q.cfg.Now().Round(0)
	m := NewMessage(id, env, 0, now, q.cfg.Schedule)
	envJSON, err := json.Marshal(envRecord{V: 1, Envelope: m.Envelope, Received: m.Received, Expires: m.Expires})
	if err != nil {
		return "", err
	}
	if q.journalOn() && !q.cfg.NoJournal {
		bp, bodyAt, hdr, ok, err := q.journalRecord(id, envJSON, ctxReader{ctx, body})
		defer putJournalBuf(bp)
		if err != nil {
			if ctx.Err() != nil {
				return "", ctx.Err()
			}
			return "", storageErr(fmt.Errorf("queue: body: %w", err))
		}
		if ok {
			return q.enqueueJournal(ctx, id, m, env.Held, (*bp), hdr)
		}
		// Too large for the journal: a file of its own, starting with
		// what was read.
		body = io.MultiReader(bytes.NewReader((*bp)[bodyAt:]), body)
	}
	tmp := filepath.Join(q.tmp, string(id))
	f, err := q.createTmp(tmp)
	if err != nil {
		return "", storageErr(fmt.Errorf("queue: %w", err))
	}
	committed := false
	defer func() {
		f.Close()
		if !committed {
			os.Remove(tmp)
		}
	}()
	pre := appendRecord(make([]byte, headerSize, headerSize+recHdrSize+len(envJSON)), envJSON)
	// Pooled buffers: a message costs no fresh 64 KiB writer nor 32 KiB
	// copy buffer, which the garbage collector would pay for at every
	// submission.
	bw := dirWriters.Get().(*bufio.Writer)
	bw.Reset(dirFile{f, q})
	defer func() {
		bw.Reset(nil)
		dirWriters.Put(bw)
	}()
	if _, err := bw.Write(pre); err != nil {
		return "", storageErr(fmt.Errorf("queue: write: %w", err))
	}
	cw := &countWriter{w: bw, crc: newCRC()}
	cbuf := dirCopyBufs.Get().(*[]byte)
	_, err = io.CopyBuffer(onlyWriter{cw}, ctxReader{ctx, body}, *cbuf)
	dirCopyBufs.Put(cbuf)
	if err != nil {
		if ctx.Err() != nil {
			return "", ctx.Err()
		}
		return "", storageErr(fmt.Errorf("queue: body: %w", err))
	}
	if err := bw.Flush(); err != nil {
		return "", storageErr(fmt.Errorf("queue: write: %w", err))
	}
	hdr := fileHeader{bodyOff: int64(len(pre)), bodySize: cw.n, bodyCRC: cw.crc.Sum32()}
	if err := q.fault("write"); err != nil {
		return "", storageErr(fmt.Errorf("queue: write: %w", err))
	}
	if _, err := f.WriteAt(hdr.marshal(), 0); err != nil {
		return "", storageErr(fmt.Errorf("queue: write: %w", err))
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	if q.mode == syncFile {
		if err := q.fsync(f); err != nil {
			return "", storageErr(fmt.Errorf("queue: sync: %w", err))
		}
	}
	if err := q.commit(&commitReq{f: f, created: true}); err != nil {
		return "", storageErr(fmt.Errorf("queue: commit: %w", err))
	}
	// The message is durable in tmp/ now. The rename into msg/ is not
	// synced: if a crash loses it, recovery finds the complete,
	// checksummed file in tmp/ and moves it into msg/ itself. Each writer
	// renames its own file, so the renames run in parallel and outside
	// the committer.
	if err := renameFile(tmp, q.file(id)); err != nil {
		return "", fmt.Errorf("queue: %w", err)
	}
	committed = true
	m.Size = cw.n
	q.mu.Lock()
	if q.closed {
		// Durable, and found again on the next open.
		q.mu.Unlock()
		return id, nil
	}
	e := q.add(id, m, env.Held)
	if !env.Held && q.nfresh < maxFresh {
		// What readMessage would find in the file just written. m is
		// Enqueue's own (NewMessage copied the recipients).
		size := hdr.bodyOff + hdr.bodySize
		e.fresh = &diskMessage{msg: m, hdr: hdr, end: size, size: size}
		q.nfresh++
	}
	q.signal()
	q.mu.Unlock()
	return id, nil
}

// enqueueJournal commits an ENQ record built by journalRecord and indexes
// the message.
func (q *Dir) enqueueJournal(ctx context.Context, id ID, m *Message, held bool, b []byte, hdr fileHeader) (ID, error) {
	if err := ctx.Err(); err != nil {
		return "", err
	}
	rec := &jrnRec{b: b, typ: jrnEnq}
	if err := q.commit(&commitReq{rec: rec}); err != nil {
		return "", storageErr(fmt.Errorf("queue: commit: %w", err))
	}
	at := int64(jrnHdrSize + 1 + len(id))
	loc := &jrnLoc{seg: rec.seg, off: rec.off + at, n: int64(len(b)) - at, hdr: hdr}
	m.Size = hdr.bodySize
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return id, nil // durable, and found again on the next open
	}
	e := q.add(id, m, held)
	e.jrn = loc
	if !held && q.nfresh < maxFresh {
		e.fresh = &diskMessage{msg: m, hdr: hdr, end: loc.n, size: loc.n}
		q.nfresh++
	}
	q.signal()
	return id, nil
}

// Lease implements Queue. It waits on a timer set to the next due time (at
// most a second, so an injected clock is followed) and is woken early by
// Enqueue, Settle, Release and Retry. Messages of every stream are leased
// earliest due first.
func (q *Dir) Lease(ctx context.Context, n int, d time.Duration) ([]*Lease, error) {
	return q.lease(ctx, "", n, d)
}

// LeaseStream implements StreamLeaser. It looks only at the stream's own
// due heap, so a backlog in another stream costs it nothing.
func (q *Dir) LeaseStream(ctx context.Context, stream string, n int, d time.Duration) ([]*Lease, error) {
	return q.lease(ctx, StreamName(stream), n, d)
}

// lease leases due messages of stream, or of every stream when it is "".
func (q *Dir) lease(ctx context.Context, stream string, n int, d time.Duration) ([]*Lease, error) {
	if n <= 0 {
		n = 1
	}
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		q.mu.Lock()
		if q.closed {
			q.mu.Unlock()
			return nil, ErrClosed
		}
		now := q.cfg.Now()
		type pick struct {
			e     *dirEntry
			lease dirLease
		}
		var picks []pick
		for len(picks) < n {
			e := q.first(stream)
			if e == nil || e.next > now.UnixNano() {
				break
			}
			e.lease = &dirLease{token: string(NewID()), until: now.Add(d)}
			e.next = e.lease.until.UnixNano()
			q.reschedule(e)
			picks = append(picks, pick{e, *e.lease})
		}
		wait := time.Second
		if e := q.first(stream); e != nil {
			wait = min(wait, time.Duration(e.next-now.UnixNano()))
		}
		wake := q.wake
		q.mu.Unlock()

		var out []*Lease
		for _, p := range picks {
			l, err := q.loadLease(p.e, p.lease, now)
			if err != nil {
				return out, err
			}
			if l != nil {
				out = append(out, l)
			}
		}
		if len(out) > 0 {
			return out, nil
		}
		if len(picks) > 0 {
			continue
		}
		t := time.NewTimer(max(wait, time.Millisecond))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-wake:
		case <-t.C:
		}
		t.Stop()
	}
}

// loadLease reads a freshly leased message. It returns nil (and undoes the
// lease) when the message vanished, is damaged or has nothing due.
func (q *Dir) loadLease(e *dirEntry, lease dirLease, now time.Time) (*Lease, error) {
	mu := q.stripe(e.id)
	mu.Lock()
	defer mu.Unlock()
	q.mu.Lock()
	dm := e.fresh
	q.dropFresh(e)
	journaled := e.jrn != nil
	q.mu.Unlock()
	if dm != nil && !journaled {
		// A file gone or cut short since Enqueue is read (and
		// quarantined) as before; a stat costs far less than a read.
		if st, err := os.Stat(q.file(e.id)); err != nil || st.Size() != dm.size {
			dm = nil
		}
	}
	var err error
	if dm == nil {
		dm, err = q.read(e)
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.idx[e.id] != e || e.lease == nil || e.lease.token != lease.token {
		return nil, nil // deleted or changed meanwhile
	}
	if err != nil {
		if errors.Is(err, errCorrupt) || errors.Is(err, ErrNotFound) {
			q.remove(e)
			q.mu.Unlock()
			q.quarantineEntry(e, err)
			q.mu.Lock()
			return nil, nil
		}
		e.lease = nil
		e.next = now.Add(time.Minute).UnixNano()
		q.reschedule(e)
		q.log.Error("queue: cannot read leased message", "id", e.id, "err", err)
		return nil, nil
	}
	m := dm.msg
	due := m.DueRecipients(now)
	if len(due) == 0 || dm.held {
		e.lease = nil
		e.held = dm.held
		q.refresh(e, m)
		return nil, nil
	}
	e.lease.dm = &diskMessage{msg: m.Clone(), held: dm.held, hdr: dm.hdr, end: dm.end, size: dm.size}
	m.State = StateLeased
	return &Lease{Token: lease.token, Message: m, Due: due, Until: lease.until}, nil
}

// Settle implements Queue. The outcome is appended to the message file and
// made durable (in a group commit) before Settle returns; a message whose
// recipients are all final is removed without waiting for a sync, since
// at worst it is delivered again after a crash.
func (q *Dir) Settle(ctx context.Context, l *Lease, outcomes []Outcome) (*Message, error) {
	if l == nil || l.Message == nil {
		return nil, ErrLeaseLost
	}
	id := l.Message.ID
	mu := q.stripe(id)
	mu.Lock()
	defer mu.Unlock()
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return nil, ErrClosed
	}
	e := q.idx[id]
	if e == nil || e.lease == nil || e.lease.token != l.Token {
		q.mu.Unlock()
		return nil, ErrLeaseLost
	}
	q.settling.Add(1)
	defer q.settling.Done()
	// Claim: while we write, Lease must not hand the message out again.
	saved := e.lease
	e.lease = &dirLease{token: l.Token, until: time.Unix(0, 1<<62)}
	q.refresh(e, l.Message)
	q.mu.Unlock()

	restore := func() {
		q.mu.Lock()
		if q.idx[id] == e {
			e.lease = saved
			e.next = saved.until.UnixNano()
			q.reschedule(e)
		}
		q.mu.Unlock()
	}
	var dm *diskMessage
	if c := saved.dm; c != nil {
		// A copy: a failed Settle restores the lease with its cache intact.
		dm = &diskMessage{msg: c.msg.Clone(), held: c.held, hdr: c.hdr, end: c.end, size: c.size}
	} else {
		var err error
		if dm, err = q.read(e); err != nil {
			restore()
			return nil, err
		}
	}
	m := dm.msg
	old := m.Clone()
	now := q.cfg.Now()
	m.State = StateQueued
	done := ApplyOutcomes(m, outcomes, now, q.cfg.Schedule)
	if dm.held {
		m.State = StateHeld
	}
	if done {
		loc := q.jrnOf(e)
		if loc == nil {
			err := q.discard(id)
			if err != nil && !errors.Is(err, os.ErrNotExist) {
				restore()
				return nil, err
			}
		}
		q.mu.Lock()
		q.remove(e)
		q.countDomains(old, -1)
		q.signal()
		q.mu.Unlock()
		// Not waited for, like the file's removal: at worst the message
		// is delivered again after a crash.
		q.unjournal(id, loc, true)
		return m, nil
	}
	if rec := diffState(old, m, dm.held, dm.held); rec != nil {
		if err := q.copyOut(e); err != nil {
			restore()
			return nil, err
		}
		if err := q.appendState(id, dm, rec, true); err != nil {
			restore()
			return nil, err
		}
	}
	q.mu.Lock()
	e.lease = nil
	e.held = dm.held
	q.countDomains(old, -1)
	q.countDomains(m, 1)
	q.refresh(e, m)
	q.signal()
	q.mu.Unlock()
	return m, nil
}

// appendState appends rec to a message file, durably when sync is set. On
// failure the file is cut back so that no partial record remains. Callers
// hold the message's stripe lock.
func (q *Dir) appendState(id ID, dm *diskMessage, rec *stateRecord, sync bool) error {
	p, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(q.file(id), os.O_WRONLY, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%w: %s", ErrNotFound, id)
		}
		return err
	}
	defer f.Close()
	b := appendRecord(nil, p)
	if err = q.fault("write"); err == nil {
		_, err = f.WriteAt(b, dm.end)
	}
	if err == nil && sync {
		switch q.mode {
		case syncFile:
			err = q.fsync(f)
		case syncFS:
			err = q.commit(&commitReq{f: f})
		}
	}
	if err != nil {
		f.Truncate(dm.end)
		return storageErr(fmt.Errorf("queue: update %s: %w", id, err))
	}
	dm.end += int64(len(b))
	dm.size = dm.end
	return nil
}

// Open implements Queue. The reader checks the body's checksum at EOF.
func (q *Dir) Open(ctx context.Context, id ID) (io.ReadCloser, error) {
	if q.isClosed() {
		return nil, ErrClosed
	}
	if !validID(id) {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	// Under the stripe lock, so that Settle does not recycle the file
	// between the open and the count (see discard).
	mu := q.stripe(id)
	mu.Lock()
	q.mu.Lock()
	var loc *jrnLoc
	if e := q.idx[id]; e != nil {
		loc = e.jrn
	}
	q.mu.Unlock()
	if loc != nil {
		br := q.journalReader(id, loc)
		mu.Unlock()
		return br, nil
	}
	f, err := os.Open(q.file(id))
	if err == nil {
		q.mu.Lock()
		q.readers[id]++
		q.mu.Unlock()
	}
	mu.Unlock()
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%w: %s", ErrNotFound, id)
		}
		return nil, err
	}
	br := &bodyReader{f: f, crc: newCRC(), id: id, done: func() { q.readerDone(id) }}
	var hb [headerSize]byte
	if _, err := io.ReadFull(f, hb[:]); err != nil {
		br.Close()
		return nil, corruptf("message %s: %v", id, err)
	}
	h, err := parseHeader(hb[:])
	if err != nil {
		br.Close()
		return nil, err
	}
	br.r, br.want = io.NewSectionReader(f, h.bodyOff, h.bodySize), h.bodyCRC
	return br, nil
}

func (q *Dir) readerDone(id ID) {
	q.mu.Lock()
	if q.readers[id]--; q.readers[id] <= 0 {
		delete(q.readers, id)
	}
	q.mu.Unlock()
}

// maxFree bounds the finished files kept for reuse.
const maxFree = 256

// discard removes the file of a finished message, keeping it for reuse
// (recycle) when it can. Callers hold the message's stripe lock.
//
// Creating a file and removing it again for every message makes ext4
// allocate and free an inode each time, and with many recently freed
// inodes around the allocation has to skip them one by one: under load
// the create in Enqueue was the largest single cost of the queue. A
// recycled file keeps its inode: discard renames it to tmp/free.N, and
// createTmp opens it with O_TRUNC and renames it to tmp/ID, so Enqueue
// writes the next message into it as into a new file.
//
// Recovery discards tmp/free.N (not a valid ID), and a recycled file is
// cut to nothing (O_TRUNC) before it takes a message's name: journalled
// file systems apply the truncation and the rename in that order, so
// after a crash tmp/ID holds nothing of the old message and is
// discarded, or it holds the new one complete (it was synced), or not.
// A file with an open reader (Open) is removed instead: the reader must
// not see another message's bytes.
func (q *Dir) discard(id ID) error {
	path := q.file(id)
	q.mu.Lock()
	busy := q.readers[id] > 0
	q.mu.Unlock()
	q.freeMu.Lock()
	if busy || len(q.free) >= maxFree {
		q.freeMu.Unlock()
		return os.Remove(path)
	}
	q.freeSeq++
	name := filepath.Join(q.tmp, fmt.Sprintf("free.%d", q.freeSeq))
	q.freeMu.Unlock()
	if err := renameFile(path, name); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return err
		}
		return os.Remove(path)
	}
	q.freeMu.Lock()
	q.free = append(q.free, name)
	q.freeMu.Unlock()
	return nil
}

// createTmp creates the file a new message is written to at path (in
// tmp/): a recycled one (see discard) when there is one, else a new one.
func (q *Dir) createTmp(path string) (*os.File, error) {
	for {
		q.freeMu.Lock()
		n := len(q.free)
		if n == 0 {
			q.freeMu.Unlock()
			return os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		}
		name := q.free[n-1]
		q.free = q.free[:n-1]
		q.freeMu.Unlock()
		f, err := os.OpenFile(name, os.O_RDWR|os.O_TRUNC, 0)
		if err != nil {
			os.Remove(name)
			continue
		}
		if err := renameFile(name, path); err != nil {
			f.Close()
			os.Remove(name)
			continue
		}
		return f, nil
	}
}

// Close implements Queue: pending Lease calls return ErrClosed, the
// committer stops and the directory lock is released. Messages stay on
// disk for the next OpenDir. Body readers (Open) of journaled messages
// that are still open fail after Close: close them first. An open reader
// also keeps its journal segment, and every later one, from being
// reused, so readers must not be left open.
func (q *Dir) Close() error {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return nil
	}
	q.closed = true
	q.signal()
	q.mu.Unlock()
	q.settling.Wait()
	q.stopKeeper()
	// Writers that already handed a request to the committer get their
	// answer; later ones get ErrClosed.
	q.commitMu.Lock()
	q.commitClosed = true
	close(q.commitCh)
	q.commitMu.Unlock()
	<-q.commitDone
	q.freeMu.Lock()
	for _, name := range q.free {
		os.Remove(name)
	}
	q.free = nil
	q.freeMu.Unlock()
	q.closeSegments()
	q.msgDir.Close()
	q.tmpDir.Close()
	return q.lockF.Close()
}

// Less orders index entries by next in their stream's due heap.
func (e *dirEntry) Less(o *dirEntry) bool { return e.next < o.next }

// SetIndex records e's place in its stream's due heap.
func (e *dirEntry) SetIndex(i int) { e.hi = i }

// Less orders streams with a non-empty due heap by their earliest entry,
// in Dir.tops.
func (s *dirStream) Less(o *dirStream) bool { return s.due[0].next < o.due[0].next }

// SetIndex records s's place in Dir.tops.
func (s *dirStream) SetIndex(i int) { s.ti = i }

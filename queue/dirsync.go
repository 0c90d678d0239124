package queue

import (
	"errors"
	"os"
	"sync/atomic"
	"syscall"
	"time"
)

// syncMode says how a Dir makes writes durable.
type syncMode int

const (
	// syncFS: writers do not sync their own files; the committer calls
	// syncfs(2) once per group, which flushes every file of the group,
	// with its directory entry (and the rest of the file system), in one
	// journal commit.
	syncFS syncMode = iota + 1
	// syncFile: each writer fsyncs its own file (concurrent fsyncs share
	// journal commits in the kernel); the committer syncs the tmp
	// directory once per group.
	syncFile
	// syncNone: nothing is synced (DirConfig.NoSync; tests only).
	syncNone
)

// commitReq is one writer's share of a group commit.
type commitReq struct {
	// f is a file whose data must be durable (nil for none). In syncFile
	// mode the writer has already synced it.
	f *os.File
	// created says that f is new in tmp/: its name must be durable too.
	created bool
	// dirSync asks for the msg directory to be synced (for unlinks).
	dirSync bool
	// rec is a journal record to append (see dirjournal.go).
	rec *jrnRec
	err error
	// done is closed when the group is done; nil when nobody waits for
	// the request (commitAsync).
	done chan struct{}
}

// committer runs group commits: it takes every request that arrived while
// the previous group was syncing, syncs once for all of them, and wakes
// their writers.
func (q *Dir) committer() {
	defer close(q.commitDone)
	defer q.syncLazy()
	var batch []*commitReq
	lazyTimer := time.NewTimer(time.Hour)
	lazyTimer.Stop()
	for {
		var r *commitReq
		var ok bool
		if len(q.jrn.lazy) > 0 {
			// DONE records written without a sync (see runBatch) are
			// synced with the next group that has writers waiting, or
			// after lazyDelay at the latest.
			lazyTimer.Reset(lazyDelay)
			select {
			case r, ok = <-q.commitCh:
				lazyTimer.Stop()
			case <-lazyTimer.C:
				q.syncLazy()
				continue
			}
		} else {
			r, ok = <-q.commitCh
		}
		if !ok {
			return
		}
		batch = append(batch[:0], r)
		open := true
	drain:
		for len(batch) < 4096 {
			select {
			case r, ok := <-q.commitCh:
				if !ok {
					open = false
					break drain
				}
				batch = append(batch, r)
			default:
				break drain
			}
		}
		q.runBatch(batch)
		q.groups.Add(1)
		for _, r := range batch {
			if r.done != nil {
				close(r.done)
			}
		}
		if !open {
			return
		}
	}
}

func (q *Dir) runBatch(batch []*commitReq) {
	recs := false // the group wrote journal records
	fail := func(err error) {
		for _, r := range batch {
			if r.err == nil {
				r.err = err
			}
		}
		if recs {
			// Whichever sync failed, the group's ENQ records are not
			// acknowledged: uncount them.
			q.journalFailed(batch)
			recs = false
		}
	}
	// DONE records of failed groups are written again (see
	// journalFailed); their writers are gone.
	if len(q.jrn.retry) > 0 {
		batch = append(q.jrn.retry, batch...)
		q.jrn.retry = nil
	}
	renames, dirSync, files, waiters := false, false, false, false
	for _, r := range batch {
		renames = renames || r.created
		dirSync = dirSync || r.dirSync
		files = files || r.f != nil || r.dirSync
		recs = recs || r.rec != nil
		waiters = waiters || r.done != nil
	}
	var segs []*jrnSeg
	if recs {
		var err error
		segs, err = q.journalWrite(batch)
		if err == nil && !waiters && !files && q.mode != syncNone {
			// Only DONE records, which nobody waits for: their sync
			// can wait for the next group's (see committer).
			q.addLazy(segs)
			return
		}
		defer q.syncDone(segs)
		if err != nil {
			err = storageErr(err)
			for _, r := range batch {
				if r.rec != nil && r.err == nil {
					r.err = err
				}
			}
			q.journalFailed(batch)
			recs = false
		}
	}
	if recs && (q.mode == syncFile || q.mode == syncFS && !files) {
		// The records are durable with their segments' data; nothing
		// else in the group needs a file-system journal commit.
		if err := q.syncJournal(append(segs, q.jrn.lazy...)); err != nil {
			fail(storageErr(err))
			return
		}
		q.lazySynced()
	}
	switch q.mode {
	case syncFS:
		if !files {
			return
		}
		// One syncfs makes every file of the group durable, with the
		// directory entries (and the renames and unlinks of earlier
		// groups), and the journal segments too.
		if err := q.syncfs(); err != nil {
			fail(err)
			return
		}
		q.lazySynced() // syncfs flushed them too
	case syncFile:
		// The writers synced their files; their names in tmp/ still
		// need the directory synced. Deletions need msg/ synced.
		if renames {
			if err := q.fsync(q.tmpDir); err != nil {
				fail(err)
				return
			}
		}
		if dirSync {
			if err := q.fsync(q.msgDir); err != nil {
				fail(err)
				return
			}
		}
	}
}

// commit hands r to the committer and waits for its group to be durable.
// It does not give up when a context is cancelled: a write that may
// already be durable must not be reported as failed.
func (q *Dir) commit(r *commitReq) error {
	r.done = make(chan struct{})
	q.commitMu.RLock()
	if q.commitClosed {
		q.commitMu.RUnlock()
		return ErrClosed
	}
	q.commitCh <- r
	q.commitMu.RUnlock()
	<-r.done
	return r.err
}

// commitAsync hands r to the committer without waiting for it: for
// records whose loss in a crash costs at most a repeated delivery (DONE).
// After Close it does nothing.
func (q *Dir) commitAsync(r *commitReq) {
	q.commitMu.RLock()
	if !q.commitClosed {
		q.commitCh <- r
	}
	q.commitMu.RUnlock()
}

// fsync syncs one open file, counting the call.
func (q *Dir) fsync(f *os.File) error {
	if q.mode == syncNone {
		return nil
	}
	if err := q.fault("sync"); err != nil {
		return err
	}
	q.syncs.Add(1)
	return f.Sync()
}

func (q *Dir) syncfs() error {
	if err := q.fault("sync"); err != nil {
		return err
	}
	q.syncs.Add(1)
	return syncFilesystem(q.msgDir)
}

// fault is the test seam for I/O errors (see Dir.faults).
func (q *Dir) fault(op string) error {
	if q.faults == nil {
		return nil
	}
	return q.faults(op)
}

// storageErr marks errors caused by a full disk or exhausted quota so that
// they match ErrNoSpace.
func storageErr(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) || errors.Is(err, syscall.EFBIG) {
		return errors.Join(ErrNoSpace, err)
	}
	return err
}

// syncCounter is embedded in Dir to count syncs and commit groups for
// benchmarks and tests.
type syncCounter struct {
	syncs  atomic.Int64
	groups atomic.Int64
}

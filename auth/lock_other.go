//go:build !unix

package auth

import "context"

// lockFile is a no-op where flock is not available: concurrent edits from
// two processes may then lose one of the edits, but never tear the file.
func lockFile(ctx context.Context, path string) (func(), error) {
	return func() {}, ctx.Err()
}

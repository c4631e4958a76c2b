package source

// httpReaderAt is the ReaderAt of an httpSource: a windowCache whose windows
// are fetched with one Range request each. The alias keeps the name the
// HTTP code and its tests know it by.
type httpReaderAt = windowCache

func newHTTPReaderAt(s *httpSource) *httpReaderAt {
	return newWindowCache(rangeMedium{
		size:  s.size,
		ctx:   s.ctx,
		fetch: s.fetch,
		wrap:  s.wrap,
		// The probe's body is only worth keeping to serve window 0 or
		// the stream; random access shows neither is coming, so its
		// connection can go.
		beyondFirst: s.dropProbe,
		track:       s.trackBackground,
		untrack:     s.background.Done,
	}, s.opts.ReadAhead)
}

// trackBackground registers a prefetch that Close must wait for, unless
// Close has already begun.
func (s *httpSource) trackBackground() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.background.Add(1)
	return true
}

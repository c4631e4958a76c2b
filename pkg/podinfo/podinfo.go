// Package podinfo tells a component about the pod it runs in.
package podinfo

import (
	"context"
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// OwnImage is the image of the named container of the caller's own pod (the
// first container when none has that name): the pods a component starts
// run the same image, so an installation names its image once.
func OwnImage(ctx context.Context, cs kubernetes.Interface, ns, pod, container string) (string, error) {
	if pod == "" {
		return "", fmt.Errorf("--worker-image is required outside a pod (POD_NAME is not set)")
	}
	p, err := cs.CoreV1().Pods(ns).Get(ctx, pod, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("reading the component's own pod to learn the worker image: %w", err)
	}
	for _, c := range p.Spec.Containers {
		if c.Name == container {
			return c.Image, nil
		}
	}
	return p.Spec.Containers[0].Image, nil
}
